//! Running this host's part of its public names: listeners started and stopped, routes and names replaced in
//! place, the ACME worker told which names to hold.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError};

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tracing::info;

use super::PublicOptions;
use super::acme::Worker;
use super::certs::Certificates;
use super::forward::Upstreams;
use super::listen::{self, Shared};
use crate::host::statedir::StateDir;
use meshd_core::acme::renewal::Status;
use meshd_core::input::PublicName;
use meshd_core::plan::PublicPlan;
use meshd_core::relay::route::{Route, Routes, TlsMode};

/// A running listener, stopped when dropped.
struct Listening {
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What this host runs for public names.
pub struct Public {
    options: PublicOptions,
    state: StateDir,
    shared: Arc<Shared>,
    public: Option<Listening>,
    passthrough: Option<Listening>,
    worker: Option<Worker>,
}

impl Public {
    /// Nothing served yet; certificates kept under `state`. Errors: the TLS configuration could not be made.
    pub fn new(options: PublicOptions, state: &StateDir) -> anyhow::Result<Public> {
        let shared = Shared::new(Arc::new(Certificates::default())).context("the public names' TLS configuration")?;
        Ok(Public {
            options,
            state: state.clone(),
            shared: Arc::new(shared),
            public: None,
            passthrough: None,
            worker: None,
        })
    }

    /// Serve exactly what `plan` says: listeners started or stopped, routes and names replaced in place.
    /// Errors: a public port or the terminator's address that cannot be bound (nothing else changed).
    pub fn apply(&mut self, plan: &PublicPlan) -> anyhow::Result<()> {
        // New listeners are made first, and kept only once all are: a bind that fails stops nothing that runs.
        let new_public = match &self.public {
            None if !plan.routes.is_empty() => Some(self.listen_public()?),
            _ => None,
        };
        let wanted = plan.passthrough_listen();
        let new_passthrough = match &self.passthrough {
            Some(running) if running.addrs == wanted => None,
            _ if wanted.is_empty() => None,
            _ => Some(self.listen_passthrough(&wanted)?),
        };
        let source = plan.mesh.iter().copied().find(IpAddr::is_ipv4);
        let mut current = self.shared.source.write().unwrap_or_else(PoisonError::into_inner);
        if *current != source {
            *current = source;
            *self.shared.upstreams.write().unwrap_or_else(PoisonError::into_inner) =
                Upstreams::new(source, plan.ranges.clone());
        }
        drop(current);
        let https_port = self.options.https_port;
        let routes = Routes::new(plan.routes.iter().map(|(n, r)| (n.to_string(), r.clone())), https_port);
        let terminated =
            plan.terminated.iter().map(|(n, &upstream)| (n.to_string(), Route { tls: TlsMode::Terminate, upstream }));
        *self.shared.public.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
        *self.shared.terminated.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Routes::new(terminated, https_port));
        *self.shared.passthrough_from.write().unwrap_or_else(PoisonError::into_inner) = plan.passthrough_from.clone();
        let names: BTreeSet<PublicName> = plan.terminated.keys().cloned().collect();
        // Names this host passes through (and does not also terminate, as a relay that is the service's node
        // does): it must keep no key for them, such as one from when it terminated them.
        let passed: BTreeSet<PublicName> = (plan.routes.iter())
            .filter(|(name, route)| route.tls == TlsMode::Passthrough && !plan.terminated.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        if (!names.is_empty() || !passed.is_empty()) && self.worker.is_none() {
            self.worker = Some(Worker::start(self.options.acme.clone(), self.state.clone(), self.shared.certs.clone()));
        }
        if let Some(worker) = &self.worker {
            worker.want(names, passed);
        }
        if plan.routes.is_empty() {
            self.public = None;
        } else if new_public.is_some() {
            self.public = new_public;
        }
        if wanted.is_empty() {
            self.passthrough = None;
        } else if new_passthrough.is_some() {
            self.passthrough = new_passthrough;
        }
        Ok(())
    }

    /// The state of `name`'s certificate at `now` (unix seconds), if this host holds it.
    pub fn certificate(&self, name: &PublicName, now: u64) -> Option<Status> {
        self.worker.as_ref()?.status(name, now)
    }

    /// The state at `now` of every certificate this host holds, by name (what a member reports to the hub).
    pub fn certificates(&self, now: u64) -> BTreeMap<PublicName, Status> {
        self.worker.as_ref().map(|w| w.statuses(now)).unwrap_or_default()
    }

    /// The public HTTP and HTTPS listeners, on every address of the host.
    fn listen_public(&self) -> anyhow::Result<Listening> {
        let bind = |port| {
            let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
            crate::host::socket::listen_internet(addr).map(|l| (addr, l)).map_err(|e| {
                let held = (e.kind() == std::io::ErrorKind::AddrInUse)
                    .then(|| crate::host::ports::holder(crate::host::ports::Transport::Tcp, port))
                    .flatten();
                match held {
                    Some(holder) => anyhow::anyhow!(
                        "cannot listen on port {port} for public names: another process holds it ({holder}); stop it \
                         or choose another --http-port/--https-port"
                    ),
                    None => anyhow::Error::new(e)
                        .context(format!("cannot listen on port {port} for public names (--http-port/--https-port)")),
                }
            })
        };
        let (https_addr, https) = bind(self.options.https_port)?;
        let (http_addr, http) = bind(self.options.http_port)?;
        info!(https = self.options.https_port, http = self.options.http_port, "serving public names");
        Ok(Listening {
            addrs: vec![https_addr, http_addr],
            tasks: vec![
                tokio::spawn(listen::serve_https(https, self.shared.clone())),
                tokio::spawn(listen::serve_http(http, self.shared.clone())),
            ],
        })
    }

    /// The passthrough terminator on this host's mesh addresses.
    fn listen_passthrough(&self, addrs: &[SocketAddr]) -> anyhow::Result<Listening> {
        let mut tasks = Vec::new();
        for &addr in addrs {
            let listener = crate::host::socket::listen_tcp(addr)
                .with_context(|| format!("cannot listen on {addr} for passthrough names"))?;
            tasks.push(tokio::spawn(listen::serve_passthrough(listener, self.shared.clone())));
        }
        Ok(Listening { addrs: addrs.to_vec(), tasks })
    }
}
