//! `meshctl apply`: make the network match a declaration file. The plan comes from meshd's pure
//! [`declare`] core; this edge reads the network through the admin API, prints the plan, sends the
//! plan's requests as one batch (all or nothing) and hands out the new devices' configs and invite tokens.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use meshd_core::declare::{self, Current, Declaration, Plan, Step};
use meshd_core::handout::{self, DeviceDns};
use meshd_core::input::Label;
use meshd_core::keys::PrivateKey;
use meshd_core::tor::client::ClientKey;
use meshd_core::wire::admin::{Reply, Request};
use serde::Serialize;

use crate::admin::BatchRefused;
use crate::commands::handout::device_config;
use crate::commands::onion::{Before, ClientFiles, take_back};
use crate::commands::{Context, unexpected};
use crate::output::{Existing, Format, Output};

/// What `meshctl apply` was asked to do.
pub struct Apply {
    pub file: PathBuf,
    pub dry_run: bool,
    pub out_dir: PathBuf,
    pub expires: Duration,
}

/// What was done, printed at the end (as JSON with `--json`).
#[derive(Serialize)]
struct Report<'a> {
    changes: &'a [Step],
    waiting: &'a [declare::Waiting],
    dry_run: bool,
    /// How many changes were carried out.
    applied: usize,
    invites: Vec<NewInvite>,
    configs: Vec<NewConfig>,
    tor_clients: Vec<NewTorClient>,
}

/// A new onion service client's line, written once the service's node reported the address.
#[derive(Serialize)]
struct NewTorClient {
    service: Label,
    device: Label,
    /// `DIR/DEVICE.SERVICE.auth_private` (0600); the QR code is beside it with `.png` added.
    path: PathBuf,
}

#[derive(Serialize)]
struct NewInvite {
    name: Label,
    token: String,
}

#[derive(Serialize)]
struct NewConfig {
    device: Label,
    address: String,
    address_v6: String,
    path: PathBuf,
}

/// Read the file and the network, print the plan, and carry it out unless this is a dry run.
pub fn apply(cx: &Context, args: Apply) -> anyhow::Result<()> {
    let file = args.file.display();
    let text = fs::read_to_string(&args.file).with_context(|| format!("cannot read {file}"))?;
    let current = read_network(cx)?;
    let declaration = Declaration::parse(&text, &current.hub).map_err(|e| anyhow!("{file}: {e}"))?;
    let plan = declare::plan(&declaration, &current).map_err(|e| anyhow!("{file}: {e}"))?;
    // Every config file is checked before the first change, and written before the batch is committed.
    let mut configs = Vec::new();
    let mut paths: BTreeMap<PathBuf, &Label> = BTreeMap::new();
    for step in &plan.steps {
        if let Step::AddDevice { name, .. } = step {
            let path = config_path(&args.out_dir, name)?;
            if let Some(other) = paths.insert(path.clone(), name) {
                bail!("devices {other} and {name} would both have their config in {}: rename one", path.display());
            }
            let output = Output::open(&path, Format::Conf, Existing::Refuse)?;
            let dns = declaration.device_dns.get(name).cloned().unwrap_or_default();
            configs.push(ConfigFile { name: name.clone(), output, dns });
        }
    }
    let mut client_lines = Vec::new();
    for step in &plan.steps {
        if let Step::ExposeTor { service, clients, .. } = step {
            for device in clients {
                client_lines.push(ClientLine::open(&args.out_dir, service, device)?);
            }
        }
    }

    let mut report = Report {
        changes: &plan.steps,
        waiting: &plan.waiting,
        dry_run: args.dry_run,
        applied: 0,
        invites: Vec::new(),
        configs: Vec::new(),
        tor_clients: Vec::new(),
    };
    if !cx.json {
        print_plan(&plan);
    }
    let outcome = if args.dry_run || plan.steps.is_empty() {
        Ok(())
    } else {
        execute(cx, &plan, args.expires.as_secs(), configs, &mut report)
            .and_then(|keys| hand_out_clients(cx, &plan, &current, keys, client_lines, &mut report))
    };
    if cx.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !plan.steps.is_empty() {
        match args.dry_run {
            true => println!("dry run: {} changes, none applied", plan.steps.len()),
            false => println!("applied {} of {} changes", report.applied, plan.steps.len()),
        }
        for c in &report.configs {
            println!("device {}: {}, {}; config in {}", c.device, c.address, c.address_v6, c.path.display());
        }
        for c in &report.tor_clients {
            println!("Tor client {} of {}: key in {} (and a QR code beside it)", c.device, c.service, c.path.display());
        }
        // Tokens last, one `NAME TOKEN` line each, for scripts.
        for invite in &report.invites {
            println!("{} {}", invite.name, invite.token);
        }
    }
    outcome
}

/// The network through the admin API: the same view for a running daemon and for offline work.
fn read_network(cx: &Context) -> anyhow::Result<Current> {
    let status = match cx.admin.send(Request::Status)? {
        Reply::Status(status) => status,
        other => return unexpected(other),
    };
    let invites = match cx.admin.send(Request::NodeInvites)? {
        Reply::Invites(invites) => invites,
        other => return unexpected(other),
    };
    let rules = match cx.admin.send(Request::AccessList)? {
        Reply::Rules(rules) => rules,
        other => return unexpected(other),
    };
    Ok(Current::from_views(&status, &invites, &rules)?)
}

fn print_plan(plan: &Plan) {
    for step in &plan.steps {
        println!("{step}");
    }
    for waiting in &plan.waiting {
        println!("{waiting}");
    }
    if plan.steps.is_empty() {
        println!("no changes");
    }
}

/// A new device's config file, resolved before anything changes.
struct ConfigFile {
    name: Label,
    output: Output,
    dns: DeviceDns,
}

/// Carry the plan out as one batch: the controller makes every change or, refusing one, none. The batch
/// is previewed first, and the new devices' configs are written (staged) from the preview before the
/// batch is committed asking for exactly those hand-outs; then they are put in place and the invite
/// tokens handed out. Returns the new onion service clients' keys, by service and device.
fn execute(
    cx: &Context,
    plan: &Plan,
    invite_secs: u64,
    mut configs: Vec<ConfigFile>,
    report: &mut Report<'_>,
) -> anyhow::Result<ClientKeys> {
    let mut device_keys = Vec::new();
    let mut client_keys = ClientKeys::new();
    let mut requests = Vec::new();
    // The step each request belongs to, to name the change the controller refused.
    let mut step_of = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let made = step.requests(
            invite_secs,
            || {
                let key = PrivateKey::generate();
                let public = key.public_key();
                device_keys.push(key);
                public
            },
            |service, device| {
                let key = ClientKey::generate();
                let public = key.public_key();
                client_keys.insert((service.clone(), device.clone()), key);
                public
            },
        );
        step_of.extend(std::iter::repeat_n(i, made.len()));
        requests.extend(made);
    }
    let total = plan.steps.len();
    // As for `device add`: no other hand-out between the preview and the commit.
    let _lock = cx.admin.lock_hand_out();
    // Only a refusal says for sure that nothing happened (not, say, a daemon gone mid-call).
    let refused = |e: anyhow::Error| match e.downcast_ref::<BatchRefused>().and_then(|r| step_of.get(r.index)) {
        Some(&i) => anyhow!("change {} of {total} ({}) failed: {e}; nothing was applied", i + 1, plan.steps[i]),
        None => e,
    };
    let previewed =
        match cx.admin.send(Request::Preview { request: Box::new(Request::Batch { requests: requests.clone() }) }) {
            Ok(Reply::Batch(replies)) => replies,
            Ok(other) => return unexpected(other),
            Err(e) => return Err(refused(e)),
        };
    if device_keys.len() != configs.len() {
        bail!("{} device keys for {} config files", device_keys.len(), configs.len());
    }
    let mut handouts = device_keys.iter().zip(configs.iter_mut());
    for (request, reply) in requests.iter_mut().zip(previewed) {
        let (Request::DeviceAdd { expect, .. }, Reply::DeviceHandout(handout)) = (request, reply) else { continue };
        let (key, config) = handouts.next().context("a device was added that the plan did not make a key for")?;
        let mut device = device_config(key, &handout);
        config.dns.apply_to(&mut device);
        // Never hand out a config that would not read back as itself.
        device.validate().map_err(|e| anyhow!("refusing to hand out the config of device {}: {e}", config.name))?;
        let bytes = config.output.render(&device.to_wg_quick())?;
        config.output.stage(&bytes)?;
        *expect = Some(handout);
    }

    let replies = match cx.admin.send(Request::Batch { requests }) {
        Ok(Reply::Batch(replies)) => replies,
        Ok(other) => return unexpected(other),
        Err(e) if e.is::<BatchRefused>() => return Err(refused(e)),
        Err(e) => return Err(unclear_outcome(cx, e, &device_keys, &mut configs)),
    };
    report.applied = total;

    let mut placed = configs.iter_mut();
    let mut unplaced = Vec::new();
    for reply in replies {
        match reply {
            Reply::Invite(issued) => report.invites.push(NewInvite { name: issued.invite.name, token: issued.token }),
            Reply::DeviceHandout(handout) => {
                let Some(config) = placed.next() else { continue };
                match config.output.place() {
                    Ok(()) => report.configs.push(NewConfig {
                        device: handout.device.name.clone(),
                        address: handout.device.address.to_string(),
                        address_v6: handout.device.address_v6.to_string(),
                        path: config.output.path().to_owned(),
                    }),
                    Err(e) => unplaced.push(format!("device {}: {e:#}", handout.device.name)),
                }
            }
            Reply::NetworkUpdated(updated) => super::status::warn_stale_mtu(&updated),
            _ => {}
        }
    }
    match unplaced.is_empty() {
        true => Ok(client_keys),
        false => bail!("applied, but some device configs could not be put in place: {}", unplaced.join("; ")),
    }
}

/// New onion service clients' keys, by (service, device).
type ClientKeys = BTreeMap<(Label, Label), ClientKey>;

/// Where a new onion service client's line goes, checked before anything changes.
struct ClientLine {
    service: Label,
    device: Label,
    files: ClientFiles,
}

impl ClientLine {
    /// `DIR/DEVICE.SERVICE.auth_private` and its QR code beside it (`.png` added); neither may exist.
    fn open(dir: &Path, service: &Label, device: &Label) -> anyhow::Result<ClientLine> {
        if !fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
            bail!("--out-dir {} is not a directory", dir.display());
        }
        let files = ClientFiles::open(&dir.join(format!("{device}.{service}.auth_private")))?;
        Ok(ClientLine { service: service.clone(), device: device.clone(), files })
    }
}

/// Once each service with new clients has its address reported by its node, write the clients' lines. A
/// service whose node reports none (offline, no tor there) has its onion service put back as it was before the
/// apply, as `meshctl expose --tor --client` does: a key nobody received must not stay authorized.
fn hand_out_clients(
    cx: &Context,
    plan: &Plan,
    current: &Current,
    keys: ClientKeys,
    mut lines: Vec<ClientLine>,
    report: &mut Report<'_>,
) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for step in &plan.steps {
        let Step::ExposeTor { service, clients, .. } = step else { continue };
        if clients.is_empty() {
            continue;
        }
        let written = super::onion::find(cx, service).and_then(|view| super::onion::address_of(cx, view)).and_then(
            |(view, address)| {
                let Some(address) = address else {
                    bail!("node {} did not report its onion address within 30 s (is it online?)", view.node)
                };
                for line in lines.iter_mut().filter(|l| &l.service == service) {
                    let key =
                        keys.get(&(line.service.clone(), line.device.clone())).context("a client without a key")?;
                    line.files.stage(&key.auth_private_line(&address))?;
                }
                for line in lines.iter_mut().filter(|l| &l.service == service) {
                    line.files.place()?;
                    let path = line.files.path().to_owned();
                    report.tor_clients.push(NewTorClient {
                        service: service.clone(),
                        device: line.device.clone(),
                        path,
                    });
                }
                Ok(())
            },
        );
        if let Err(e) = written {
            let moved = plan.steps.iter().any(|s| matches!(s, Step::MoveService { name, .. } if name == service));
            let before = (current.services.iter())
                .find(|s| &s.name == service && !moved)
                .and_then(|s| s.tor.as_ref())
                .and_then(|t| t.port.map(|port| Before { port, authorized_only: t.authorized_only }));
            let undone = match take_back(cx, service, before, clients) {
                Ok(()) => {
                    format!("its onion service is as it was before, without new clients {}", declare_list(clients))
                }
                Err(undo) => format!("taking its new clients off failed too ({undo:#})"),
            };
            failed.push(format!("service {service}: {e:#}; {undone}"));
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => bail!("applied, but Tor client keys could not be handed out: {}", failed.join("; ")),
    }
}

fn declare_list(labels: &[Label]) -> String {
    labels.iter().map(Label::as_str).collect::<Vec<_>>().join(",")
}

/// The batch got no clear answer (a daemon gone mid-call, a change saved but not applied to the
/// interface): the new devices' configs are put in place if the devices exist with their new keys,
/// kept where they were staged if that cannot be told, and dropped if the batch was not carried out.
fn unclear_outcome(cx: &Context, e: anyhow::Error, keys: &[PrivateKey], configs: &mut [ConfigFile]) -> anyhow::Error {
    let devices = match cx.admin.send(Request::DeviceList) {
        Ok(Reply::Devices(devices)) => Some(devices),
        _ => None,
    };
    let made = |key: &PrivateKey, config: &ConfigFile| {
        devices
            .as_ref()
            .map(|list| list.iter().any(|d| d.name == config.name && d.public_key == Some(key.public_key())))
    };
    let mut notes = Vec::new();
    for (key, config) in keys.iter().zip(configs.iter_mut()) {
        match made(key, config) {
            Some(true) => match config.output.place() {
                Ok(()) => notes.push(format!(
                    "device {} was added, its config is in {}",
                    config.name,
                    config.output.path().display()
                )),
                Err(placing) => notes.push(format!("device {} was added: {placing:#}", config.name)),
            },
            Some(false) => {}
            None => {
                if let Some(kept) = config.output.keep_staged() {
                    notes.push(format!("the config of device {} is kept in {}", config.name, kept.display()));
                }
            }
        }
    }
    match notes.is_empty() {
        true => e,
        false => e.context(notes.join("; ")),
    }
}

/// Where a new device's config goes: `DIR/NAME.conf`, NAME shortened to a tunnel name the WireGuard
/// apps import (see [`handout::tunnel_name`]).
fn config_path(dir: &Path, name: &Label) -> anyhow::Result<PathBuf> {
    if !fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
        bail!("--out-dir {} is not a directory", dir.display());
    }
    Ok(dir.join(format!("{}.conf", handout::tunnel_name(name.as_str()))))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use meshd::controller::fixtures::label;
    use meshd::host::statedir::StateDir;
    use meshd_core::handout::DeviceConfig;
    use meshd_core::model::AccessRule;

    use super::*;
    use crate::admin::Admin;
    use crate::testing::{meshctl, network, snapshot};

    const DECLARATION: &str = r#"
[[node]]
name = "consensus"

[[node]]
name = "validator"
disabled = true

[[service]]
name = "beacon"
node = "consensus"
target = "127.0.0.1:5052"
https = [{ hostname = "beacon.example.org", relay = "hub", tls = "passthrough" }]

[[device]]
name = "phone"
allow = ["beacon"]

[[access]]
from = ["consensus"]
to = "validator"
"#;

    #[test]
    fn apply_to_joined_members_converges_and_then_changes_nothing() {
        let dir = network(&["consensus", "validator", "old"]);
        meshctl(&dir, &["service", "add", "junk", "--node", "old", "--target", "127.0.0.1:1"]).unwrap();
        meshctl(&dir, &["access", "allow", "old", "validator"]).unwrap();
        let file = dir.0.join("net.toml");
        fs::write(&file, DECLARATION).unwrap();
        let out = dir.0.join("out");
        fs::create_dir(&out).unwrap();
        let apply = |extra: &[&str]| {
            let mut args = vec!["apply", file.to_str().unwrap(), "--out-dir", out.to_str().unwrap()];
            args.extend(extra);
            meshctl(&dir, &args)
        };
        apply(&["--dry-run"]).unwrap();
        assert_eq!(snapshot(&dir).nodes.len(), 4, "a dry run changes nothing");
        apply(&[]).unwrap();

        let s = snapshot(&dir);
        let nodes: Vec<(&str, bool)> = s.nodes.iter().map(|n| (n.name.as_str(), n.disabled)).collect();
        assert_eq!(nodes, [("hub", false), ("consensus", false), ("validator", true)]);
        assert_eq!(s.services.len(), 1);
        assert_eq!((s.services[0].name.as_str(), s.services[0].node.as_str()), ("beacon", "consensus"));
        assert_eq!(s.devices.len(), 1);
        assert_eq!(s.devices[0].allow, [label("beacon")]);
        assert_eq!(s.rules, [AccessRule { from: label("consensus"), to: label("validator") }]);
        let exposure = &s.exposures[..];
        assert_eq!(exposure.len(), 1);
        assert_eq!((exposure[0].hostname.as_str(), exposure[0].relay.as_str()), ("beacon.example.org", "hub"));
        assert_eq!(exposure[0].tls, meshd_core::relay::route::TlsMode::Passthrough);
        let conf = out.join("phone.conf");
        assert_eq!(fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&conf).unwrap();
        assert_eq!(DeviceConfig::parse(&text).unwrap().peer.public_key, s.hub().unwrap().public_key);

        let db = fs::read(StateDir::new(&dir.0).db()).unwrap();
        apply(&[]).unwrap();
        assert!(fs::read(StateDir::new(&dir.0).db()).unwrap() == db, "a second apply changed meshd.db");
        let admin = Admin::new(&dir.0, None);
        let (Reply::Status(status), Reply::Invites(invites), Reply::Rules(rules)) = (
            admin.send(Request::Status).unwrap(),
            admin.send(Request::NodeInvites).unwrap(),
            admin.send(Request::AccessList).unwrap(),
        ) else {
            panic!("unexpected replies")
        };
        let current = Current::from_views(&status, &invites, &rules).unwrap();
        let plan = declare::plan(&Declaration::parse(DECLARATION, &current.hub).unwrap(), &current).unwrap();
        assert_eq!(plan, declare::Plan::default());
    }
}
