//! The `meshd` binary: `meshd init` creates a network with this host as its controller and hub,
//! `meshd run` runs this host's part of it in the foreground.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshd::controller::{Controller, NewNetwork};
use meshd::host::statedir::{DEFAULT_STATE_DIR, StateDir};
use meshd::host::tor::TorOptions;
use meshd::host::wg::Backend;
use meshd::host::{hostnet, owner};
use meshd::relay::{AcmeOptions, PublicOptions};
use meshd::runtime::RunOptions;
use meshd_core::input::{self, HostPort, InterfaceName, Label};
use meshd_core::keys::PrivateKey;
use meshd_core::wire::invite::Token;
use meshd_core::wire::join::{HubContact, JoinReply, JoinRequest};

#[derive(Parser)]
#[command(name = "meshd", version, about = "WireGuard mesh controller and node daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new network whose controller and hub is this host.
    Init {
        /// Name of the network (a DNS label); the default domain is NAME.internal.
        #[arg(long)]
        network: Label,
        /// Name of this host in the network (a DNS label).
        #[arg(long)]
        name: Label,
        /// Where devices and other hosts reach this host: HOST:PORT (public address or DNS name).
        #[arg(long, value_parser = input::parse_endpoint)]
        endpoint: HostPort,
        /// IPv4 range of the mesh.
        #[arg(long, default_value = "10.77.0.0/16", value_parser = input::parse_cidr)]
        cidr: ipnet::Ipv4Net,
        /// DNS domain of the mesh [default: NETWORK.internal].
        #[arg(long, value_parser = input::parse_domain)]
        domain: Option<String>,
        /// State directory.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// WireGuard interface name.
        #[arg(long, default_value = "meshd0", value_parser = input::parse_interface)]
        interface: InterfaceName,
        /// UDP port WireGuard listens on [default: the endpoint's port].
        #[arg(long, value_parser = input::parse_port)]
        listen_port: Option<u16>,
        /// MTU of the mesh interfaces (hosts without their own) and of devices' configs, 1280-9000: 1500
        /// less 60 over IPv4 or 80 over IPv6, from the smallest path between hosts (1340 behind a 1400 hop).
        #[arg(long, default_value_t = meshd_core::model::MESH_MTU, value_parser = input::parse_mtu)]
        mtu: u16,
    },
    /// Join a network with an invite token from `meshctl node invite`; then start it with `meshd run`.
    Join {
        /// The invite token, or - to read it from standard input (keeps it off the command line).
        token: String,
        /// State directory.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where other hosts reach this one: HOST:PORT (omit behind NAT without inbound).
        #[arg(long, value_parser = input::parse_endpoint)]
        endpoint: Option<HostPort>,
        /// WireGuard interface name.
        #[arg(long, default_value = "meshd0", value_parser = input::parse_interface)]
        interface: InterfaceName,
        /// UDP port WireGuard listens on [default: the endpoint's port, else 51820].
        #[arg(long, value_parser = input::parse_port)]
        listen_port: Option<u16>,
        /// MTU of this host's mesh interface, 1280-9000 [default: the network's], for a host behind a smaller path.
        #[arg(long, value_parser = input::parse_mtu)]
        mtu: Option<u16>,
    },
    /// Print this host's place in its network, one `KEY VALUE` line each: `network`, `domain`, `cidr`, `name`,
    /// `role` (hub, node or relay), `interface`, `listen_port`, `endpoint` (`-` for none), `address`, `address_v6`
    /// (for scripts: the NixOS module points systemd-resolved at `address` for `domain`, and checks that the host
    /// is still what its configuration says).
    Info {
        /// State directory.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print a JSON object with the same keys instead.
        #[arg(long)]
        json: bool,
    },
    /// Run this host's part of the network in the foreground.
    Run {
        /// State directory.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// WireGuard implementation.
        #[arg(long, value_enum, default_value = "auto")]
        wireguard: Backend,
        /// Port of the mesh DNS on this host's mesh addresses. Next to another DNS server that holds
        /// port 53 on every address (dnsmasq, Pi-hole, Unbound), serve here and have it forward the
        /// mesh domain to this port.
        #[arg(long, default_value_t = meshd_core::plan::dns::DNS_PORT, value_parser = input::parse_port)]
        dns_port: u16,
        /// The ACME directory of the CA that issues certificates for public names (`meshctl expose`): on the relay
        /// in terminate mode, on the service's node in passthrough mode. Let's Encrypt's staging directory, or a
        /// test CA's, work the same.
        #[arg(long, env = "MESHD_ACME_DIRECTORY", default_value = meshd::relay::LETS_ENCRYPT)]
        acme_directory: String,
        /// A PEM file with an extra root certificate to trust for the CA's own HTTPS (a test CA such as Pebble).
        #[arg(long)]
        acme_ca_root: Option<PathBuf>,
        /// An email address for the ACME account: the CA writes there about expiring certificates.
        #[arg(long)]
        acme_contact: Option<String>,
        /// The relay's public HTTP port: ACME HTTP-01 validations, and redirects to HTTPS.
        #[arg(long, default_value_t = 80, value_parser = input::parse_port)]
        http_port: u16,
        /// The relay's public HTTPS port.
        #[arg(long, default_value_t = 443, value_parser = input::parse_port)]
        https_port: u16,
        /// The tor that serves this host's onion services (`meshctl expose --tor`) [default: tor on PATH]. meshd
        /// starts it only while a service of this host is exposed over Tor.
        #[arg(long, value_name = "PATH")]
        tor_binary: Option<PathBuf>,
        /// A file of torrc lines appended to the configuration meshd writes for its tor (bridges, a test network).
        #[arg(long, value_name = "FILE")]
        tor_config: Option<PathBuf>,
        /// Another tor (the system's) serves this host's onion services: meshd makes and keeps their keys and
        /// client lists under STATE/tor/onion/, writes STATE/tor/services.torrc (their HiddenServiceDir lines
        /// naming DIR/SERVICE) and runs no tor. That tor's keeper copies STATE/tor/onion/SERVICE/ to DIR/SERVICE/
        /// and includes the file (the NixOS module's services.meshd.tor.backend = "system" does both).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["tor_binary", "tor_config"])]
        tor_external: Option<PathBuf>,
    },
}

/// mimalloc instead of glibc's allocator: a proxied connection makes and frees many small buffers (TLS records,
/// HTTP heads) across the runtime's threads, where glibc's arenas spent 6 % of a full-handshake connection's CPU
/// (docs/PERFORMANCE.md, "Public HTTPS relay"). Built as mimalloc 2 without transparent huge pages (the crate's `v2`
/// and `no_thp`): with its huge pages meshd's peak resident memory in the relay bench was 42-52 MiB on the relay and
/// 34-44 MiB on an idle home node, against glibc's 26 and 18; without them 26-28 and 18-19.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // meshd writes nothing that other users need to read, and some of what it makes (the userspace
    // device's UAPI socket, made by boringtun, which answers with the private key) gets its mode from the
    // umask: whatever umask meshd is started with, nothing it makes is open to others.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    let cli: Cli = meshd::parse_args();
    if !matches!(cli.command, Command::Run { .. }) {
        meshd::exit_quietly_on_closed_output();
    }
    meshd::init_logging();
    let result = match cli.command {
        Command::Init { network, name, endpoint, cidr, domain, state_dir, interface, listen_port, mtu } => {
            let domain = domain.unwrap_or_else(|| format!("{network}.internal"));
            let key = PrivateKey::generate();
            let new = NewNetwork {
                network,
                domain,
                cidr,
                hub: name,
                hub_public_key: key.public_key(),
                listen_port: listen_port.unwrap_or(endpoint.port()),
                endpoint,
                interface,
                mtu,
            };
            init(&StateDir::new(state_dir), new, &key)
        }
        Command::Join { token, state_dir, endpoint, interface, listen_port, mtu } => {
            let listen_port = listen_port.or(endpoint.as_ref().map(HostPort::port)).unwrap_or(DEFAULT_LISTEN_PORT);
            join(&StateDir::new(state_dir), &token, endpoint, interface, listen_port, mtu)
        }
        Command::Info { state_dir, json } => info(&StateDir::new(state_dir), json),
        Command::Run {
            state_dir,
            wireguard,
            dns_port,
            acme_directory,
            acme_ca_root,
            acme_contact,
            http_port,
            https_port,
            tor_binary,
            tor_config,
            tor_external,
        } => {
            let acme = AcmeOptions { directory: acme_directory, ca_root: acme_ca_root, contact: acme_contact };
            let public = PublicOptions { http_port, https_port, acme };
            let tor = TorOptions { binary: tor_binary, extra_config: tor_config, external: tor_external };
            run(&StateDir::new(state_dir), RunOptions { backend: wireguard, dns_port, public, tor })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init(state: &StateDir, new: NewNetwork, key: &PrivateKey) -> anyhow::Result<()> {
    // Checked again by the controller; here before anything is created.
    meshd_core::input::check_listen_port(new.listen_port)?;
    if let Some(route) = hostnet::overlapping(&new.cidr, &hostnet::ipv4_routes()) {
        anyhow::bail!(
            "--cidr {} overlaps {} on interface {}: choose a range this host does not use",
            new.cidr,
            route.network,
            route.interface
        );
    }
    state.create()?;
    let created = state
        .write_private_key(key)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(Controller::init(&state.db(), &new)?));
    let (_, snapshot) = match created {
        Ok(c) => c,
        Err(e) => {
            state.remove_new();
            return Err(e);
        }
    };
    let hub = snapshot.hub().map(|h| snapshot.node_view(h));
    println!("network {} created in {}", snapshot.network.name, state.root().display());
    println!("  domain    {}", snapshot.network.domain);
    println!("  ranges    {} and {}", snapshot.network.cidr, snapshot.network.pool().v6());
    if let Some(hub) = hub {
        println!("  this host {} ({}, {}), endpoint {}", hub.name, hub.address, hub.address_v6, new.endpoint);
        println!("  interface {} listening on UDP {}, MTU {}", new.interface, new.listen_port, new.mtu);
    }
    Ok(())
}

/// `meshd info`: this host's node in the network, from the controller's database or the member's cached state
/// (read as they are, with the same ownership checks as `meshd run`; a running meshd is not needed).
fn info(state: &StateDir, json: bool) -> anyhow::Result<()> {
    state.check_private()?;
    let (me, snapshot) = if state.db().exists() {
        let snapshot = Controller::open(&state.db())?.snapshot()?;
        let hub = snapshot.hub().map(|h| h.name.clone()).context("the database has no hub")?;
        (hub, snapshot)
    } else if state.member_state().exists() {
        let member = state.read_member_state()?;
        (member.me.clone(), member.state.snapshot())
    } else {
        anyhow::bail!(
            "{} holds no network: make one with `meshd init` or join one with `meshd join`",
            state.root().display()
        );
    };
    let node = snapshot
        .nodes
        .iter()
        .find(|n| n.name == me)
        .with_context(|| format!("this host ({me}) is not in the network"))?;
    let view = snapshot.node_view(node);
    let role = serde_json::to_value(view.role)?.as_str().unwrap_or_default().to_owned();
    // Checked as every value read from a file that reaches a command is: the domain goes to the host's resolver.
    let domain = input::parse_domain(&snapshot.network.domain)
        .map_err(|e| anyhow::anyhow!("the network's domain {:?} is invalid: {e}", snapshot.network.domain))?;
    let fields = [
        ("network", snapshot.network.name.to_string()),
        ("domain", domain),
        ("cidr", snapshot.network.cidr.to_string()),
        ("name", view.name.to_string()),
        ("role", role),
        ("interface", node.interface.to_string()),
        ("listen_port", node.listen_port.to_string()),
        ("endpoint", view.endpoint.clone().unwrap_or_else(|| "-".to_owned())),
        ("address", view.address.to_string()),
        ("address_v6", view.address_v6.to_string()),
    ];
    if json {
        let object: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), serde_json::Value::String(v))).collect();
        println!("{}", serde_json::Value::Object(object));
    } else {
        for (key, value) in fields {
            println!("{key} {value}");
        }
    }
    Ok(())
}

/// WireGuard's customary port, for a joining host that gives none.
const DEFAULT_LISTEN_PORT: u16 = 51820;

/// How long a join may take end to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

fn join(
    state: &StateDir,
    token: &str,
    endpoint: Option<HostPort>,
    interface: InterfaceName,
    listen_port: u16,
    mtu: Option<u16>,
) -> anyhow::Result<()> {
    let text = if token == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the token from standard input")?;
        text
    } else {
        token.to_owned()
    };
    let token = Token::decode(&text)?;
    // Refuse what would not work before the one-time token is spent: a port meshd cannot listen on, an
    // unusable state directory, an interface another meshd runs, a mesh range this host already routes elsewhere.
    meshd_core::input::check_listen_port(listen_port)?;
    state.check_new()?;
    owner::check_free(Path::new(owner::RUN_DIR), &interface)
        .map_err(|e| anyhow::anyhow!("{e}; stop that one first, or join with another --interface"))?;
    if let Some(cidr) = &token.cidr {
        refuse_overlap(&token.network, cidr, "this host cannot join it; free that range on this host first")?;
    }
    let key = PrivateKey::generate();
    let request = JoinRequest {
        id: token.id.clone(),
        secret: token.secret.clone(),
        public_key: key.public_key(),
        endpoint,
        listen_port,
        interface,
        mtu,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply: JoinReply = runtime
        .block_on(meshd::links::join::call(&token.join.to_string(), &token.fingerprint, &request, JOIN_TIMEOUT))
        .with_context(|| format!("joining network {} at {}", token.network, token.join))?;
    let mut member = match reply {
        JoinReply::Joined(member) => member,
        JoinReply::Refused(reason) => anyhow::bail!("the controller refused to join this host: {reason}"),
        JoinReply::Standing(_) => anyhow::bail!("the controller at {} answered a join with something else", token.join),
    };
    // A token from a controller of before the range was carried: checked now, when it is spent.
    if token.cidr.is_none() {
        let spent = format!(
            "this host was registered as {} but not set up: remove it with `meshctl node remove {}` and free that range on this host before joining again",
            member.me, member.me
        );
        refuse_overlap(&token.network, &member.state.network.cidr, &spent)?;
    }
    // Where this member asks where it stands when it has no sync session: the token's join address and
    // certificate, which it authenticated the controller by.
    member.hub = Some(HubContact { join: token.join.clone(), fingerprint: token.fingerprint.clone() });
    state.create()?;
    let saved = state.write_private_key(&key).and_then(|()| state.write_member_state(&member));
    if let Err(e) = saved {
        state.remove_new();
        return Err(anyhow::Error::from(e).context(format!(
            "host {} was registered but its state could not be saved; remove it with `meshctl node remove {}` and invite it again",
            member.me, member.me
        )));
    }
    let snapshot = member.state.snapshot();
    let view = snapshot.nodes.iter().find(|n| n.name == member.me).map(|n| snapshot.node_view(n));
    println!("joined network {} as {}", member.state.network.name, member.me);
    if let Some(me) = view {
        println!("  addresses {} and {}", me.address, me.address_v6);
    }
    println!("  start it:  meshd run --state-dir {}", state.root().display());
    Ok(())
}

/// A mesh range that overlaps a network this host routes would send the member's mesh traffic (its
/// route to the hub included) to that network, or that network's traffic into the mesh: refused,
/// naming the interface and the network, as `init` does; `what_now` says what the operator does.
fn refuse_overlap(network: &str, cidr: &ipnet::Ipv4Net, what_now: &str) -> anyhow::Result<()> {
    match hostnet::overlapping(cidr, &hostnet::ipv4_routes()) {
        // The range itself on an interface: this network (or one made with the same range) already runs
        // here, which the overlap would only describe obscurely.
        Some(route) if route.network == *cidr => anyhow::bail!(
            "network {network} uses {cidr}, which interface {} of this host already routes: a mesh on that range \
             runs here already (meshctl node list on its hub says which host this is); {what_now}",
            route.interface
        ),
        Some(route) => anyhow::bail!(
            "network {network} uses {cidr}, which overlaps {} on interface {} (the mesh traffic would go there): {what_now}",
            route.network,
            route.interface
        ),
        None => Ok(()),
    }
}

fn run(state: &StateDir, options: RunOptions) -> anyhow::Result<()> {
    // Before any descriptor is opened: floods are capped within this limit (host::admission).
    match meshd::host::admission::raise_open_file_limit() {
        Ok((before, now)) => tracing::debug!(before, now, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit; keeping the current one"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(meshd::runtime::run(state, options))
}
