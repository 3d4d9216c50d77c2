//! `meshctl`: the operator's command line. It talks to the controller over the admin socket in the
//! state directory, or, when no daemon runs there, opens the state itself.

mod apply;
mod output;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use meshd::controller::{self, Controller};
use meshd::host::statedir::{DEFAULT_STATE_DIR, StateDir};
use meshd::links::admin::AdminError;
use meshd_core::handout::{DeviceConfig, DeviceDns, HubPeer};
use meshd_core::input::{self, HostPort, Label};
use meshd_core::keys::PrivateKey;
use meshd_core::model::{AccessRule, DeviceView, NodeView, Protocol, Role, ServiceView};
use meshd_core::wire::admin::{DeviceHandout, Outcome, Reply, Request};
use meshd_core::wire::invite;
use output::{Existing, Format, Output};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Manage a meshd network: services, devices, nodes, access rules")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// State directory of the controller.
    #[arg(long, global = true, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Admin socket of the controller [default: STATE_DIR/meshd.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Services exposed to the mesh.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Roaming devices (phones, laptops) with the stock WireGuard app.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Hosts running meshd.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Which nodes may reach which: every node reaches every node until a node is the target of a rule.
    #[command(subcommand)]
    Access(AccessCommand),
    /// The network: nodes, devices with their last handshake, services.
    Status,
    /// Make the network match a declaration file (TOML): member nodes, services, devices, access rules.
    Apply {
        /// The declaration file.
        file: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Directory for the wg-quick configs (NAME.conf, 0600) of new devices.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
        /// How long the tokens of new invites stay valid, e.g. 90s, 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = invite::parse_duration)]
        expires: Duration,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Expose a TCP (or, with --udp, UDP) service of a node on its own mesh address.
    Add {
        name: Label,
        /// Node that hosts the service.
        #[arg(long)]
        node: Label,
        /// Where the node reaches the service: HOST:PORT (e.g. a namespace address or 127.0.0.1:PORT).
        #[arg(long)]
        target: HostPort,
        /// Port on the mesh address [default: the target's port].
        #[arg(long, value_parser = input::parse_port)]
        port: Option<u16>,
        /// Forward UDP datagrams instead of TCP connections (DNS, WireGuard, game or echo services).
        #[arg(long)]
        udp: bool,
    },
    /// List services.
    List,
    /// Remove a service (devices lose access to it).
    Remove { name: Label },
    /// Point a service elsewhere; its mesh address, protocol and the devices allowed to reach it stay.
    Update {
        name: Label,
        /// Where the node reaches the service: HOST:PORT.
        #[arg(long)]
        target: HostPort,
        /// Port on the mesh address [default: the target's port].
        #[arg(long, value_parser = input::parse_port)]
        port: Option<u16>,
        /// Switch the service to UDP.
        #[arg(long, conflicts_with = "tcp")]
        udp: bool,
        /// Switch the service to TCP.
        #[arg(long)]
        tcp: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Create a device and hand out its WireGuard config once (printed, as files or as QR codes).
    Add {
        name: Label,
        /// Services the device may reach.
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<Label>,
        #[command(flatten)]
        out: HandOut,
    },
    /// Give a device new keys and hand out its new config; the old config stops working at once.
    Rotate {
        name: Label,
        #[command(flatten)]
        out: HandOut,
    },
    /// List devices with their last handshake.
    List,
    /// Remove a device: it can reach nothing from then on.
    Remove { name: Label },
    /// Replace the services a device may reach; its keys and config stay.
    Update {
        name: Label,
        /// Services the device may reach (replacing the ones it may reach now).
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<Label>,
    },
}

/// How a device's config is handed out; with none of these, it is printed. A FILE is written 0600
/// (an existing regular file is replaced whole), a FIFO or terminal is written to as it is, `-` is
/// standard output, a symbolic link to anything but a FIFO or terminal is refused.
#[derive(Args)]
struct HandOut {
    /// Print the config as a QR code in the terminal.
    #[arg(long)]
    qr: bool,
    /// Write the config as a PNG QR code (0600).
    #[arg(long, value_name = "FILE")]
    qr_png: Option<PathBuf>,
    /// Write the config as an SVG QR code (0600).
    #[arg(long, value_name = "FILE")]
    qr_svg: Option<PathBuf>,
    /// Write the wg-quick config (0600).
    #[arg(long, value_name = "FILE")]
    conf: Option<PathBuf>,
    /// Leave the DNS line out of the config (for clients that cannot set resolvers).
    #[arg(long, conflicts_with = "dns")]
    no_dns: bool,
    /// Resolvers for the config's DNS line instead of the hub's (no search domain then).
    #[arg(long, value_name = "IP[,IP...]", value_delimiter = ',', num_args = 1, value_parser = input::parse_resolver)]
    dns: Vec<IpAddr>,
}

impl HandOut {
    fn dns(&self) -> DeviceDns {
        match (self.no_dns, self.dns.is_empty()) {
            (true, _) => DeviceDns::Omit,
            (false, false) => DeviceDns::servers(self.dns.iter().copied()),
            (false, true) => DeviceDns::Hub,
        }
    }
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List nodes.
    List,
    /// Invite a host to join: prints a one-time token for `meshd join` on that host.
    Invite {
        name: Label,
        /// What the host will be.
        #[arg(long, value_enum, default_value = "node")]
        role: InviteRole,
        /// How long the token stays valid, e.g. 90s, 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = invite::parse_duration)]
        expires: Duration,
    },
    /// List invites not yet redeemed.
    Invites,
    /// Cancel a pending invite.
    Uninvite { name: Label },
    /// Remove a member node: no host keeps it as a peer from then on.
    Remove { name: Label },
    /// Take a member out of the mesh but keep its name and addresses: no host keeps it as a peer.
    Disable { name: Label },
    /// Bring a disabled member back into the mesh.
    Enable { name: Label },
    /// Ask a member for a new key: the host makes it itself on its next contact with the controller.
    Rotate { name: Label },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Let node FROM reach node TO; TO then admits only the nodes its rules name.
    Allow { from: Label, to: Label },
    /// Take a rule away; a node left without rules is reachable by every node again.
    Revoke { from: Label, to: Label },
    /// List the rules.
    List,
}

/// Roles an invited host can take.
#[derive(Clone, Copy, clap::ValueEnum)]
enum InviteRole {
    Node,
    Relay,
}

fn main() -> ExitCode {
    meshd::exit_quietly_on_closed_output();
    let cli: Cli = meshd::parse_args();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Status => match send(g, Request::Status)? {
            Reply::Status(s) => print(g, &s, || {
                println!(
                    "network {} ({}, {}), domain {}",
                    s.network.name, s.network.cidr, s.network.cidr_v6, s.network.domain
                );
                print_nodes(&s.nodes);
                print_devices(&s.devices);
                print_services(&s.services);
            }),
            other => unexpected(other),
        },
        Command::Node(NodeCommand::List) => match send(g, Request::NodeList)? {
            Reply::Nodes(nodes) => print(g, &nodes, || print_nodes(&nodes)),
            other => unexpected(other),
        },
        Command::Node(NodeCommand::Invite { name, role, expires }) => {
            let role = match role {
                InviteRole::Node => Role::Node,
                InviteRole::Relay => Role::Relay,
            };
            match send(g, Request::NodeInvite { name, role, expires_secs: expires.as_secs() })? {
                Reply::Invite(issued) => {
                    let i = &issued.invite;
                    eprintln!(
                        "invite for {} expires in {} s; on that host run: meshd join - (token on stdin)",
                        i.name,
                        expires.as_secs()
                    );
                    print(g, &issued, || println!("{}", issued.token))
                }
                other => unexpected(other),
            }
        }
        Command::Node(NodeCommand::Invites) => match send(g, Request::NodeInvites)? {
            Reply::Invites(invites) => print(g, &invites, || {
                println!("{:<20} {:<6} EXPIRES IN", "NAME", "ROLE");
                for i in &invites {
                    let left = i.expires_at - meshd::host::clock::wall_now();
                    println!("{:<20} {:<6} {left} s", i.name, role_name(i.role));
                }
            }),
            other => unexpected(other),
        },
        Command::Node(NodeCommand::Uninvite { name }) => {
            removed(g, Request::NodeUninvite { name: name.clone() }, "invite for", &name)
        }
        Command::Node(NodeCommand::Remove { name }) => {
            removed(g, Request::NodeRemove { name: name.clone() }, "node", &name)
        }
        Command::Node(NodeCommand::Disable { name }) => {
            done(g, Request::NodeDisable { name: name.clone() })?;
            node_changed(g, &name, &format!("node {name} disabled: no host keeps it as a peer until it is enabled"))
        }
        Command::Node(NodeCommand::Enable { name }) => {
            done(g, Request::NodeEnable { name: name.clone() })?;
            node_changed(g, &name, &format!("node {name} enabled: it is in the mesh again"))
        }
        Command::Node(NodeCommand::Rotate { name }) => {
            done(g, Request::NodeRotate { name: name.clone() })?;
            node_changed(g, &name, &format!("node {name} will make a new key on its next contact with the controller"))
        }
        Command::Access(AccessCommand::Allow { from, to }) => {
            done(g, Request::AccessAllow { from: from.clone(), to: to.clone() })?;
            let rule = AccessRule { from, to };
            print(g, &serde_json::json!({ "allowed": rule }), || {
                println!("{} may reach {}; {} admits only the nodes its rules name", rule.from, rule.to, rule.to)
            })
        }
        Command::Access(AccessCommand::Revoke { from, to }) => {
            done(g, Request::AccessRevoke { from: from.clone(), to: to.clone() })?;
            let rule = AccessRule { from, to };
            print(g, &serde_json::json!({ "revoked": rule }), || println!("revoked {} -> {}", rule.from, rule.to))
        }
        Command::Access(AccessCommand::List) => match send(g, Request::AccessList)? {
            Reply::Rules(rules) => print(g, &rules, || print_rules(&rules)),
            other => unexpected(other),
        },
        Command::Apply { file, dry_run, out_dir, expires } => {
            apply::apply(g, apply::Apply { file, dry_run, out_dir, expires })
        }
        Command::Service(ServiceCommand::List) => match send(g, Request::ServiceList)? {
            Reply::Services(services) => print(g, &services, || print_services(&services)),
            other => unexpected(other),
        },
        Command::Service(ServiceCommand::Add { name, node, target, port, udp }) => {
            let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
            print_service(g, send(g, Request::ServiceAdd { name, node, target, port, protocol })?)
        }
        Command::Service(ServiceCommand::Update { name, target, port, udp, tcp }) => {
            let protocol = match (udp, tcp) {
                (true, _) => Some(Protocol::Udp),
                (_, true) => Some(Protocol::Tcp),
                _ => None,
            };
            print_service(g, send(g, Request::ServiceUpdate { name, target, port, protocol })?)
        }
        Command::Service(ServiceCommand::Remove { name }) => {
            removed(g, Request::ServiceRemove { name: name.clone() }, "service", &name)
        }
        Command::Device(DeviceCommand::List) => match send(g, Request::DeviceList)? {
            Reply::Devices(devices) => print(g, &devices, || print_devices(&devices)),
            other => unexpected(other),
        },
        Command::Device(DeviceCommand::Remove { name }) => {
            removed(g, Request::DeviceRemove { name: name.clone() }, "device", &name)
        }
        Command::Device(DeviceCommand::Add { name, allow, out }) => hand_out(g, out, &name, |public_key, expect| {
            Request::DeviceAdd { name: name.clone(), allow: allow.clone(), public_key, expect }
        }),
        Command::Device(DeviceCommand::Rotate { name, out }) => hand_out(g, out, &name, |public_key, expect| {
            Request::DeviceRotate { name: name.clone(), public_key, expect }
        }),
        Command::Device(DeviceCommand::Update { name, allow }) => {
            done(g, Request::DeviceAllow { name: name.clone(), allow })?;
            let devices = match send(g, Request::DeviceList)? {
                Reply::Devices(devices) => devices,
                other => return unexpected(other),
            };
            let device =
                devices.into_iter().find(|d| d.name == name).with_context(|| format!("device {name} is gone"))?;
            print(g, &device, || println!("device {}: may reach {}", device.name, join(&device.allow)))
        }
    }
}

/// How often a hand-out is previewed and written again when the network changed meanwhile.
const HAND_OUT_ATTEMPTS: usize = 3;

/// Make a key pair and hand out device `name`'s config as `out` asks, for the change `request` makes
/// with its public half. The change is previewed first; every output is written in full (files as
/// staged copies) before the change is committed, asking for exactly the previewed hand-out; then the
/// files are put in place. A failure before the commit changes nothing; a commit refused because the
/// network changed meanwhile is tried again (unless a stream already got the config).
fn hand_out(
    g: &Global,
    out: HandOut,
    name: &Label,
    request: impl Fn(String, Option<Box<DeviceHandout>>) -> Request,
) -> anyhow::Result<()> {
    let dns = out.dns();
    // A reader that goes away (`| true`) must not end meshctl between staging files and cleaning them up:
    // here a closed output is an error like any other, and nothing is changed.
    let _sigpipe = SigpipeIgnored::new();
    let mut outputs = Vec::new();
    for (path, format) in [(&out.conf, Format::Conf), (&out.qr_png, Format::Png), (&out.qr_svg, Format::Svg)] {
        let Some(path) = path else { continue };
        let output = Output::open(path, format, Existing::Replace)?;
        if format == Format::Conf
            && output.is_file()
            && let Some(warning) = output::import_name_warning(path)
        {
            eprintln!("{warning}");
        }
        outputs.push(output);
    }
    if out.qr {
        outputs.push(Output::stdout(Format::TerminalQr));
    }
    // Without an output option the config is printed (with --json, only the device record is).
    if outputs.is_empty() && !g.json {
        outputs.push(Output::stdout(Format::Conf));
    }
    // Another meshctl handing out a config waits: previews of both would offer the same address.
    let _lock = StateDir::new(&g.state_dir).lock_hand_out().ok();
    // The key pair is made here; only the public key goes to the controller.
    let key = PrivateKey::generate();
    let public_key = key.public_key();
    let mut attempt = 0;
    let handout = loop {
        attempt += 1;
        let preview = match send(g, Request::Preview { request: Box::new(request(public_key.clone(), None)) })? {
            Reply::DeviceHandout(h) => h,
            other => return unexpected(other),
        };
        let mut config = device_config(&key, &preview);
        dns.apply_to(&mut config);
        // Never hand out a config that would not read back as itself.
        config.validate().map_err(|e| anyhow::anyhow!("refusing to hand out the device config: {e}"))?;
        let text = config.to_wg_quick();
        let rendered = outputs.iter().map(|o| o.render(&text)).collect::<anyhow::Result<Vec<_>>>()?;
        for (output, bytes) in outputs.iter_mut().zip(&rendered) {
            output.stage(bytes)?;
        }
        let streamed: Vec<String> = outputs.iter().filter(|o| !o.is_file()).map(Output::shown).collect();
        for (output, bytes) in outputs.iter_mut().zip(&rendered).filter(|(o, _)| !o.is_file()) {
            output.write_stream(bytes)?;
        }
        match send(g, request(public_key.clone(), Some(preview))) {
            Ok(Reply::DeviceHandout(h)) => break h,
            Ok(other) => return unexpected(other),
            Err(e) if e.is::<Stale>() && streamed.is_empty() && attempt < HAND_OUT_ATTEMPTS => continue,
            Err(e) => {
                // Refused, or no clear answer (a daemon gone mid-call, a change saved but not applied):
                // if the device has the new key the change was made, and its config must not be lost.
                return match device_has_key(g, name, &public_key) {
                    Some(true) => {
                        let placed: anyhow::Result<()> = outputs.iter_mut().try_for_each(Output::place);
                        placed?;
                        Err(e.context(format!("device {name} has its new key and its config was written, but")))
                    }
                    // Not made: the staged files go on drop.
                    Some(false) if streamed.is_empty() => Err(e),
                    Some(false) => Err(e.context(format!("the config written to {} is void", streamed.join(", ")))),
                    None => {
                        let kept: Vec<String> = outputs
                            .iter_mut()
                            .filter_map(Output::keep_staged)
                            .map(|p| p.display().to_string())
                            .collect();
                        match kept.is_empty() {
                            true => Err(e),
                            false => Err(e.context(format!("the config is kept in {}", kept.join(", ")))),
                        }
                    }
                };
            }
        }
    };
    for output in &mut outputs {
        output.place()?;
    }
    let d = &handout.device;
    if g.json {
        println!("{}", serde_json::to_string_pretty(d)?);
    }
    eprintln!("device {}: {}, {}; may reach {}", d.name, d.address, d.address_v6, join(&d.allow));
    Ok(())
}

/// Whether device `name` is stored with `public_key`; `None` when that cannot be found out.
fn device_has_key(g: &Global, name: &Label, public_key: &str) -> Option<bool> {
    match send(g, Request::DeviceList) {
        Ok(Reply::Devices(devices)) => Some(devices.iter().any(|d| &d.name == name && d.public_key == public_key)),
        _ => None,
    }
}

/// The device's config: the controller's hand-out and the private key made here.
/// SIGPIPE ignored while it lives (writes to a closed pipe then fail with EPIPE), its default action
/// back after.
struct SigpipeIgnored;

impl SigpipeIgnored {
    fn new() -> SigpipeIgnored {
        // SAFETY: signal(2) with SIG_IGN; meshctl is single-threaded here.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        SigpipeIgnored
    }
}

impl Drop for SigpipeIgnored {
    fn drop(&mut self) {
        meshd::exit_quietly_on_closed_output();
    }
}

fn device_config(key: &PrivateKey, h: &DeviceHandout) -> DeviceConfig {
    DeviceConfig {
        private_key: key.to_base64(),
        addresses: h.addresses.clone(),
        dns_servers: h.dns_servers.clone(),
        dns_search: h.dns_search.clone(),
        mtu: Some(h.mtu),
        peer: HubPeer {
            public_key: h.hub_public_key.clone(),
            preshared_key: h.preshared_key.clone(),
            endpoint: h.endpoint.clone(),
            allowed_ips: h.allowed_ips.clone(),
            persistent_keepalive: h.persistent_keepalive,
        },
    }
}

/// Send a request to the running daemon, or carry it out on the state directly when none runs.
fn send(g: &Global, request: Request) -> anyhow::Result<Reply> {
    let outcome = match &g.socket {
        Some(socket) => call_daemon(socket, &request)?,
        None => {
            let state = StateDir::new(&g.state_dir);
            if !state.db().exists() && state.member_state().exists() {
                bail!(
                    "{} is the state of a member host; run meshctl on the network's controller",
                    state.root().display()
                );
            }
            // Validate the state directory before anything is created in it.
            let mut controller = Controller::open(&state.db())?;
            // The shared lock is free only when no daemon runs (a socket file left by a killed
            // daemon is then ignored).
            match state.lock_offline()? {
                Some(_lock) => controller::outcome(controller.handle(request)),
                None => call_daemon(&state.socket(), &request)?,
            }
        }
    };
    match outcome {
        Outcome::Ok(reply) => Ok(reply),
        Outcome::Error(message) => bail!("{message}"),
        Outcome::BatchRefused { index, error } => Err(BatchRefused { index, error }.into()),
        Outcome::Stale(message) => Err(Stale(message).into()),
    }
}

/// The network changed since the request was previewed; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Stale(String);

/// Request `index` of a batch was refused: nothing of the batch was carried out.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub(crate) struct BatchRefused {
    /// Which request of the batch, from 0.
    pub(crate) index: usize,
    error: String,
}

fn call_daemon(socket: &Path, request: &Request) -> anyhow::Result<Outcome> {
    // A daemon that is starting holds the lock before its socket exists: give it a moment. Only a
    // connection that failed is tried again: once the request is sent, the daemon may have carried it
    // out, and sending it twice would (at best) be refused as a duplicate.
    let mut attempts = 0;
    loop {
        match meshd::links::admin::call(socket, request) {
            Ok(outcome) => return Ok(outcome),
            Err(AdminError::Connect { .. }) if attempts < 50 => attempts += 1,
            Err(e @ AdminError::Connect { .. }) => {
                return Err(e).context("meshd is running but its admin socket does not answer");
            }
            Err(e @ AdminError::TooLarge(_)) => return Err(e.into()),
            Err(e) => {
                return Err(e).context(
                    "no answer from meshd: whether the request was carried out is unknown; check with a list command",
                );
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn removed(g: &Global, request: Request, kind: &str, name: &Label) -> anyhow::Result<()> {
    match send(g, request)? {
        Reply::Removed => {
            if g.json {
                println!("{}", serde_json::json!({ "removed": name }));
            } else {
                println!("{kind} {name} removed");
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

/// Send a request whose reply is only that it was done.
fn done(g: &Global, request: Request) -> anyhow::Result<()> {
    match send(g, request)? {
        Reply::Done => Ok(()),
        other => unexpected(other),
    }
}

/// After a change to node `name`: its view with `--json`, else `line`.
fn node_changed(g: &Global, name: &Label, line: &str) -> anyhow::Result<()> {
    let nodes = match send(g, Request::NodeList)? {
        Reply::Nodes(nodes) => nodes,
        other => return unexpected(other),
    };
    let node = nodes.into_iter().find(|n| &n.name == name).with_context(|| format!("node {name} is gone"))?;
    print(g, &node, || println!("{line}"))
}

fn print_service(g: &Global, reply: Reply) -> anyhow::Result<()> {
    match reply {
        Reply::Service(s) => print(g, &s, || {
            // TCP, the default, is not named: the line stays as it was before UDP services.
            let udp = if s.protocol == Protocol::Udp { ", udp" } else { "" };
            println!("service {} on {}: {} ({}) -> {}{udp}", s.name, s.node, s.mesh_address, s.dns_name, s.target)
        }),
        other => unexpected(other),
    }
}

fn unexpected(reply: Reply) -> anyhow::Result<()> {
    bail!("the controller sent an unexpected reply: {reply:?}")
}

fn print<T: Serialize>(g: &Global, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
    if g.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human();
    }
    Ok(())
}

fn join(labels: &[Label]) -> String {
    if labels.is_empty() { "-".into() } else { labels.iter().map(Label::as_str).collect::<Vec<_>>().join(",") }
}

fn role_name(role: Role) -> String {
    serde_json::to_value(role).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn print_nodes(nodes: &[NodeView]) {
    print!("{}", nodes_table(nodes));
}

/// The node table; STATE comes last so the columns before it stay where scripts expect them.
fn nodes_table(nodes: &[NodeView]) -> String {
    let mut table =
        format!("{:<20} {:<6} {:<16} {:<28} {:<24} STATE\n", "NODE", "ROLE", "ADDRESS", "ADDRESS6", "ENDPOINT");
    for n in nodes {
        table.push_str(&format!(
            "{:<20} {:<6} {:<16} {:<28} {:<24} {}\n",
            n.name,
            role_name(n.role),
            n.address,
            n.address_v6,
            n.endpoint.as_deref().unwrap_or("-"),
            node_state(n)
        ));
    }
    table
}

fn node_state(n: &NodeView) -> &'static str {
    match (n.disabled, n.rotate_key) {
        (false, false) => "active",
        (false, true) => "key rotation pending",
        (true, false) => "disabled",
        (true, true) => "disabled, key rotation pending",
    }
}

fn print_rules(rules: &[AccessRule]) {
    if rules.is_empty() {
        println!("no access rules: every node reaches every node");
        return;
    }
    println!("{:<20} TO", "FROM");
    for rule in rules {
        println!("{:<20} {}", rule.from, rule.to);
    }
}

fn print_devices(devices: &[DeviceView]) {
    println!("{:<20} {:<16} {:<28} {:<24} LAST HANDSHAKE", "DEVICE", "ADDRESS", "ADDRESS6", "ALLOW");
    let now = meshd::host::clock::wall_now();
    for d in devices {
        let seen = d
            .last_handshake
            .map(|t| format!("{}s ago", now.saturating_sub(t as i64).max(0)))
            .unwrap_or_else(|| "never".into());
        println!("{:<20} {:<16} {:<28} {:<24} {}", d.name, d.address, d.address_v6, join(&d.allow), seen);
    }
}

fn print_services(services: &[ServiceView]) {
    print!("{}", services_table(services));
}

/// The service table; PROTOCOL comes last so the columns before it stay where scripts expect them.
fn services_table(services: &[ServiceView]) -> String {
    let mut table = format!(
        "{:<20} {:<12} {:<22} {:<32} {:<24} {:<24} PROTOCOL\n",
        "SERVICE", "NODE", "MESH ADDRESS", "DNS NAME", "TARGET", "DEVICES"
    );
    for s in services {
        table.push_str(&format!(
            "{:<20} {:<12} {:<22} {:<32} {:<24} {:<24} {}\n",
            s.name,
            s.node,
            s.mesh_address,
            s.dns_name,
            s.target,
            join(&s.devices),
            s.protocol
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    //! Commands on joined members. No host can join without a running daemon, so the members here join
    //! through the controller's own redemption of an invite, as the daemon's join service does.

    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    use meshd::controller::fixtures::{self, label};
    use meshd_core::declare::{self, Current, Declaration};
    use meshd_core::model::Snapshot;
    use meshd_core::wire::admin::JoinRequest;

    use super::*;

    /// A new directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("meshctl-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            fs::create_dir(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A state dir for network `home` (hub `hub`) in which `members` have joined as nodes behind NAT.
    fn network(members: &[&str]) -> TempDir {
        let dir = TempDir::new();
        let mut c = fixtures::new_network(&dir.0, "10.77.0.0/16");
        for name in members {
            let join = JoinRequest { endpoint: None, ..fixtures::join_request(&fixtures::invite(&mut c, name, 60)) };
            c.redeem(&join).unwrap();
        }
        dir
    }

    /// `meshctl --state-dir DIR ARGS...`, carried out in-process.
    fn meshctl(dir: &TempDir, args: &[&str]) -> anyhow::Result<()> {
        let state = dir.0.to_str().unwrap();
        execute(Cli::try_parse_from(["meshctl", "--state-dir", state].iter().chain(args)).unwrap())
    }

    fn snapshot(dir: &TempDir) -> Snapshot {
        Controller::open(&StateDir::new(&dir.0).db()).unwrap().snapshot().unwrap()
    }

    fn views(dir: &TempDir) -> Vec<NodeView> {
        let s = snapshot(dir);
        s.nodes.iter().map(|n| s.node_view(n)).collect()
    }

    /// The STATE column of `name` in the node table.
    fn state_column(dir: &TempDir, name: &str) -> String {
        let table = nodes_table(&views(dir));
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap();
        line.split_whitespace().skip(5).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn disable_enable_and_rotate_a_member_show_in_the_node_table() {
        let dir = network(&["vps"]);
        assert_eq!(state_column(&dir, "vps"), "active");
        meshctl(&dir, &["node", "disable", "vps"]).unwrap();
        assert!(snapshot(&dir).nodes[1].disabled);
        assert_eq!(state_column(&dir, "vps"), "disabled");
        let refused = meshctl(&dir, &["node", "rotate", "vps"]).unwrap_err();
        assert_eq!(refused.to_string(), "\"vps\" is disabled; enable it first");
        meshctl(&dir, &["node", "enable", "vps"]).unwrap();
        assert_eq!(state_column(&dir, "vps"), "active");
        meshctl(&dir, &["node", "rotate", "vps", "--json"]).unwrap();
        assert!(snapshot(&dir).nodes[1].rotate_key);
        assert_eq!(state_column(&dir, "vps"), "key rotation pending");
        meshctl(&dir, &["node", "disable", "vps"]).unwrap();
        assert_eq!(state_column(&dir, "vps"), "disabled, key rotation pending");
        assert_eq!(state_column(&dir, "hub"), "active");
    }

    #[test]
    fn access_rules_between_members() {
        let dir = network(&["consensus", "validator"]);
        meshctl(&dir, &["access", "allow", "consensus", "validator"]).unwrap();
        meshctl(&dir, &["access", "allow", "hub", "validator", "--json"]).unwrap();
        let rule = |from: &str, to: &str| AccessRule { from: label(from), to: label(to) };
        assert_eq!(snapshot(&dir).rules, [rule("consensus", "validator"), rule("hub", "validator")]);
        meshctl(&dir, &["access", "list"]).unwrap();
        meshctl(&dir, &["access", "revoke", "hub", "validator"]).unwrap();
        assert_eq!(snapshot(&dir).rules, [rule("consensus", "validator")]);
        let refused = meshctl(&dir, &["access", "revoke", "hub", "validator"]).unwrap_err();
        assert_eq!(refused.to_string(), "no rule lets \"hub\" reach \"validator\"");
    }

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
        let conf = out.join("phone.conf");
        assert_eq!(fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&conf).unwrap();
        assert_eq!(DeviceConfig::parse(&text).unwrap().peer.public_key, s.hub().unwrap().public_key);

        let db = fs::read(StateDir::new(&dir.0).db()).unwrap();
        apply(&[]).unwrap();
        assert!(fs::read(StateDir::new(&dir.0).db()).unwrap() == db, "a second apply changed meshd.db");
        let mut c = Controller::open(&StateDir::new(&dir.0).db()).unwrap();
        let (Reply::Status(status), Reply::Invites(invites), Reply::Rules(rules)) = (
            c.handle(Request::Status).unwrap(),
            c.handle(Request::NodeInvites).unwrap(),
            c.handle(Request::AccessList).unwrap(),
        ) else {
            panic!("unexpected replies")
        };
        let current = Current::from_views(&status, &invites, &rules).unwrap();
        let plan = declare::plan(&Declaration::parse(DECLARATION, &current.hub).unwrap(), &current).unwrap();
        assert_eq!(plan, declare::Plan::default());
    }

    #[test]
    fn udp_services_are_added_listed_and_keep_their_protocol_on_update() {
        let dir = network(&[]);
        meshctl(&dir, &["service", "add", "echo", "--node", "hub", "--target", "127.0.0.1:7", "--udp"]).unwrap();
        meshctl(&dir, &["service", "add", "web", "--node", "hub", "--target", "127.0.0.1:80"]).unwrap();
        let protocols = |dir: &TempDir| -> Vec<(String, Protocol)> {
            snapshot(dir).services.iter().map(|v| (v.name.to_string(), v.protocol)).collect()
        };
        assert_eq!(protocols(&dir), [("echo".into(), Protocol::Udp), ("web".into(), Protocol::Tcp)]);

        meshctl(&dir, &["service", "update", "echo", "--target", "127.0.0.1:7007"]).unwrap();
        assert_eq!(protocols(&dir)[0], ("echo".into(), Protocol::Udp), "an update keeps the protocol");
        meshctl(&dir, &["service", "update", "web", "--target", "127.0.0.1:53", "--udp"]).unwrap();
        assert_eq!(protocols(&dir)[1], ("web".into(), Protocol::Udp));
        meshctl(&dir, &["service", "update", "web", "--target", "127.0.0.1:53", "--tcp"]).unwrap();
        assert_eq!(protocols(&dir)[1], ("web".into(), Protocol::Tcp));
        let both = ["meshctl", "service", "update", "web", "--target", "127.0.0.1:53", "--udp", "--tcp"];
        assert!(Cli::try_parse_from(both).is_err(), "--udp and --tcp exclude each other");

        let s = snapshot(&dir);
        let views: Vec<ServiceView> = s.services.iter().map(|v| s.service_view(v)).collect();
        let table = services_table(&views);
        let last_column: Vec<&str> = table.lines().map(|l| l.split_whitespace().last().unwrap()).collect();
        assert_eq!(last_column, ["PROTOCOL", "udp", "tcp"], "{table}");
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!((json[0]["protocol"].as_str(), json[1]["protocol"].as_str()), (Some("udp"), Some("tcp")));
    }

    #[test]
    fn node_states_in_the_table() {
        let view = |name: &str, disabled, rotate_key| NodeView {
            name: label(name),
            public_key: String::new(),
            address: "10.77.0.2".parse().unwrap(),
            address_v6: "fd00::2".parse().unwrap(),
            endpoint: None,
            role: Role::Node,
            dns_name: format!("{name}.home.internal"),
            disabled,
            rotate_key,
        };
        let table = nodes_table(&[view("a", false, false), view("b", true, false), view("c", false, true)]);
        let states: Vec<&str> = table.lines().skip(1).map(|l| l.split_once(" - ").unwrap().1.trim()).collect();
        assert_eq!(states, ["active", "disabled", "key rotation pending"], "{table}");
    }
}
