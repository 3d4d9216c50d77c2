//! `meshctl`: the operator's command line. It talks to the controller over the admin socket in the
//! state directory, or, when no daemon runs there, opens the state itself.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use meshd::api::{DeviceHandout, Outcome, Reply, Request};
use meshd::controller::Controller;
use meshd::input::{self, HostPort, Label};
use meshd::invite;
use meshd::keys::PrivateKey;
use meshd::model::{DeviceView, NodeView, Role, ServiceView};
use meshd::render::{self, DeviceConfig, HubPeer};
use meshd::statedir::{DEFAULT_STATE_DIR, StateDir};
use meshd::store;
use serde::Serialize;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Manage a meshd network: services, devices, nodes")]
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
    /// The network: nodes, devices with their last handshake, services.
    Status,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Expose a TCP service of a node on its own mesh address.
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
    },
    /// List services.
    List,
    /// Remove a service (devices lose access to it).
    Remove { name: Label },
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
}

/// How a device's config is handed out; with none of these, it is printed.
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
}

/// Roles an invited host can take.
#[derive(Clone, Copy, clap::ValueEnum)]
enum InviteRole {
    Node,
    Relay,
}

fn main() -> ExitCode {
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
                    let left = i.expires_at - store::now();
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
        Command::Service(ServiceCommand::List) => match send(g, Request::ServiceList)? {
            Reply::Services(services) => print(g, &services, || print_services(&services)),
            other => unexpected(other),
        },
        Command::Service(ServiceCommand::Add { name, node, target, port }) => {
            match send(g, Request::ServiceAdd { name, node, target, port })? {
                Reply::Service(s) => print(g, &s, || {
                    println!("service {} on {}: {} ({}) -> {}", s.name, s.node, s.mesh_address, s.dns_name, s.target)
                }),
                other => unexpected(other),
            }
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
        Command::Device(DeviceCommand::Add { name, allow, out }) => {
            let undo = Request::DeviceRemove { name: name.clone() };
            hand_out(g, out, |public_key| Request::DeviceAdd { name, allow, public_key }, Some(undo))
        }
        Command::Device(DeviceCommand::Rotate { name, out }) => {
            hand_out(g, out, |public_key| Request::DeviceRotate { name, public_key }, None)
        }
    }
}

/// Make a key pair, send its public half with `request`, and hand out the device's config as `out`
/// asks. `undo` is sent if the config cannot be handed out.
fn hand_out(
    g: &Global,
    out: HandOut,
    request: impl FnOnce(String) -> Request,
    undo: Option<Request>,
) -> anyhow::Result<()> {
    let outputs = Outputs::prepare([(out.conf, Format::Conf), (out.qr_png, Format::Png), (out.qr_svg, Format::Svg)])?;
    // The key pair is made here; only the public key goes to the controller.
    let key = PrivateKey::generate();
    let handout = match send(g, request(key.public_key())) {
        Ok(Reply::DeviceHandout(h)) => h,
        Ok(other) => return unexpected(other),
        Err(e) => {
            outputs.discard();
            return Err(e);
        }
    };
    let config = device_config(&key, &handout);
    if let Err(e) = config.validate() {
        // Never hand out a config that would not read back as itself.
        outputs.discard();
        if let Some(undo) = undo {
            let _ = send(g, undo);
        }
        bail!("refusing to hand out the device config: {e}");
    }
    let text = config.to_wg_quick();
    let printed_elsewhere = out.qr || !outputs.is_empty();
    outputs.write(&text)?;
    if out.qr {
        print!("{}", render::qr_terminal(&text)?);
    }
    let d = &handout.device;
    if g.json {
        println!("{}", serde_json::to_string_pretty(d)?);
    } else if !printed_elsewhere {
        print!("{text}");
    }
    eprintln!("device {}: {}, {}; may reach {}", d.name, d.address, d.address_v6, join(&d.allow));
    Ok(())
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
                Some(_lock) => {
                    controller.handle(request).map(Outcome::Ok).unwrap_or_else(|e| Outcome::Error(e.to_string()))
                }
                None => call_daemon(&state.socket(), &request)?,
            }
        }
    };
    match outcome {
        Outcome::Ok(reply) => Ok(reply),
        Outcome::Error(message) => bail!("{message}"),
    }
}

fn call_daemon(socket: &Path, request: &Request) -> anyhow::Result<Outcome> {
    // A daemon that is starting holds the lock before its socket exists: give it a moment.
    let mut last = None;
    for _ in 0..50 {
        match meshd::admin::call(socket, request) {
            Ok(outcome) => return Ok(outcome),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(last.expect("at least one attempt")).context("meshd is running but its admin socket does not answer")
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
    println!("{:<20} {:<6} {:<16} {:<28} ENDPOINT", "NODE", "ROLE", "ADDRESS", "ADDRESS6");
    for n in nodes {
        let role = role_name(n.role);
        println!(
            "{:<20} {:<6} {:<16} {:<28} {}",
            n.name,
            role,
            n.address,
            n.address_v6,
            n.endpoint.as_deref().unwrap_or("-")
        );
    }
}

fn print_devices(devices: &[DeviceView]) {
    println!("{:<20} {:<16} {:<28} {:<24} LAST HANDSHAKE", "DEVICE", "ADDRESS", "ADDRESS6", "ALLOW");
    let now = store::now();
    for d in devices {
        let seen = d
            .last_handshake
            .map(|t| format!("{}s ago", now.saturating_sub(t as i64).max(0)))
            .unwrap_or_else(|| "never".into());
        println!("{:<20} {:<16} {:<28} {:<24} {}", d.name, d.address, d.address_v6, join(&d.allow), seen);
    }
}

fn print_services(services: &[ServiceView]) {
    println!("{:<20} {:<12} {:<22} {:<32} {:<24} DEVICES", "SERVICE", "NODE", "MESH ADDRESS", "DNS NAME", "TARGET");
    for s in services {
        println!(
            "{:<20} {:<12} {:<22} {:<32} {:<24} {}",
            s.name,
            s.node,
            s.mesh_address,
            s.dns_name,
            s.target,
            join(&s.devices)
        );
    }
}

#[derive(Clone, Copy)]
enum Format {
    Conf,
    Png,
    Svg,
}

/// Output files of `device add`, created (0600, under a temporary name) before the device is
/// registered, so that an unwritable path fails before anything changes.
struct Outputs(Vec<(PathBuf, PathBuf, Format)>);

impl Outputs {
    fn prepare(wanted: [(Option<PathBuf>, Format); 3]) -> anyhow::Result<Outputs> {
        let mut outputs = Outputs(Vec::new());
        for (path, format) in wanted {
            let Some(path) = path else { continue };
            let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
            let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
            if let Err(e) = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
                outputs.discard();
                return Err(e).with_context(|| format!("cannot write {}", path.display()));
            }
            outputs.0.push((path, tmp, format));
        }
        Ok(outputs)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn discard(&self) {
        for (_, tmp, _) in &self.0 {
            let _ = fs::remove_file(tmp);
        }
    }

    fn write(&self, text: &str) -> anyhow::Result<()> {
        for (path, tmp, format) in &self.0 {
            let bytes = match format {
                Format::Conf => text.as_bytes().to_vec(),
                Format::Png => render::qr_png(text)?,
                Format::Svg => render::qr_svg(text)?.into_bytes(),
            };
            let mut file = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(tmp, path).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}
