//! `meshctl`: the operator's command line. Here are its commands and flags (a contract: scripts use
//! them) and which code carries each out: the commands in [`commands`] and [`apply`] reach the
//! controller only through [`admin::Admin`] (over the admin socket in the state directory, or, when no
//! daemon runs there, in-process), and print with [`mod@print`].

mod admin;
mod commands;
mod output;
mod print;
#[cfg(test)]
mod testing;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use commands::{Context, access, devices, nodes, onion, services, status};
use meshd::host::statedir::DEFAULT_STATE_DIR;
use meshd_core::handout::DeviceDns;
use meshd_core::input::{self, HostPort, Label, PublicName};
use meshd_core::model::{Protocol, Role};
use meshd_core::relay::route::TlsMode;
use meshd_core::wire::admin::EndpointChange;
use meshd_core::wire::invite;

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
    /// The network's own settings.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Serve a TCP service beyond the mesh: on a public name over HTTPS through a relay whose public address the
    /// name points at (the certificate comes from the CA of `meshd run --acme-directory`), or as a Tor onion
    /// service from its own node, optionally only to chosen devices (client authorization).
    #[command(group(clap::ArgGroup::new("way").required(true).args(["https", "tor"])))]
    Expose {
        /// The service.
        service: Label,
        /// The public name, e.g. pay.shop.example (its DNS must point at the relay).
        #[arg(long, value_name = "HOSTNAME", requires = "relay")]
        https: Option<PublicName>,
        /// The relay: the hub or a node that joined with --role relay, with an endpoint.
        #[arg(long, value_name = "NODE", requires = "https")]
        relay: Option<Label>,
        /// Where TLS ends: on the relay (it holds the certificate and sees the requests), or on the service's
        /// node (the relay passes the encrypted stream through and never holds the key).
        #[arg(long, value_name = "MODE", default_value = "terminate", requires = "https")]
        tls: TlsMode,
        /// Serve it as a Tor onion service from its node (the address is its node's to keep; `service list`
        /// shows it).
        #[arg(long)]
        tor: bool,
        /// The port at the .onion address [default: the one it has, else the service's mesh port].
        #[arg(long, requires = "tor", conflicts_with = "https", value_parser = input::parse_port)]
        port: Option<u16>,
        /// A device to authorize (repeat for several): from then on only authorized devices can find the
        /// service. Each gets a new client key, printed once as the line Orbot and tor import.
        #[arg(long = "client", value_name = "DEVICE", requires = "tor", conflicts_with = "https")]
        clients: Vec<Label>,
        /// Also print each new client's line as a QR code in the terminal.
        #[arg(long, requires = "tor", conflicts_with = "https")]
        qr: bool,
        /// Also write each new client's line to DIR/DEVICE.auth_private and its QR code to
        /// DIR/DEVICE.auth_private.png (0600; an existing file is refused before anything changes).
        #[arg(long, value_name = "DIR", requires = "tor", conflicts_with = "https")]
        out_dir: Option<PathBuf>,
    },
    /// Stop serving a service on a public name, or over Tor (or, with --client, take devices off its clients).
    #[command(group(clap::ArgGroup::new("way").required(true).args(["https", "tor"])))]
    Unexpose {
        /// The service.
        service: Label,
        /// The public name.
        #[arg(long, value_name = "HOSTNAME")]
        https: Option<PublicName>,
        /// Its onion service.
        #[arg(long)]
        tor: bool,
        /// Only take this device off the onion service's clients (repeat for several); its node publishes a new
        /// descriptor without it.
        #[arg(long = "client", value_name = "DEVICE", requires = "tor", conflicts_with = "https")]
        clients: Vec<Label>,
    },
    /// Make the network match a declaration file (TOML): member nodes, services, devices, access rules.
    Apply {
        /// The declaration file.
        file: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Directory for the wg-quick configs (NAME.conf, 0600) of new devices, and the client key lines
        /// (DEVICE.SERVICE.auth_private and .png, 0600) of new Tor clients.
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
    /// List services, with their public URLs and onion addresses.
    List {
        /// Also print each onion service's URL as a QR code in the terminal, for a phone to scan.
        #[arg(long)]
        qr: bool,
    },
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
    /// Change where a node (the hub included) is reached, or its own MTU; every host follows within a second.
    Update {
        name: Label,
        /// Where other hosts (and, for the hub, devices) reach it from now on: HOST:PORT (a DNS name is
        /// best for the hub: devices keep it in their config).
        #[arg(long, value_name = "HOST:PORT", value_parser = input::parse_endpoint)]
        endpoint: Option<HostPort>,
        /// The node has no endpoint any more (behind NAT); refused for the hub.
        #[arg(long, conflicts_with = "endpoint")]
        no_endpoint: bool,
        /// Its mesh interface's own MTU from now on, 1280-9000 (the host sets it at once).
        #[arg(long, value_parser = input::parse_mtu)]
        mtu: Option<u16>,
    },
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Change the network's MTU: every host without its own takes it at once; devices' configs name
    /// the old one until handed out again (meshctl says which).
    Update {
        /// The mesh MTU, 1280-9000.
        #[arg(long, value_parser = input::parse_mtu)]
        mtu: u16,
    },
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

impl From<InviteRole> for Role {
    fn from(role: InviteRole) -> Role {
        match role {
            InviteRole::Node => Role::Node,
            InviteRole::Relay => Role::Relay,
        }
    }
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

/// Carry out one command line.
fn execute(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let cx = Context { admin: admin::Admin::new(&g.state_dir, g.socket.as_deref()), json: g.json };
    match cli.command {
        Command::Status => status::status(&cx),
        Command::Network(NetworkCommand::Update { mtu }) => status::update_network(&cx, mtu),
        Command::Node(command) => match command {
            NodeCommand::List => nodes::list(&cx),
            NodeCommand::Invite { name, role, expires } => nodes::invite(&cx, name, role.into(), expires),
            NodeCommand::Invites => nodes::invites(&cx),
            NodeCommand::Uninvite { name } => nodes::uninvite(&cx, name),
            NodeCommand::Remove { name } => nodes::remove(&cx, name),
            NodeCommand::Disable { name } => nodes::disable(&cx, name),
            NodeCommand::Enable { name } => nodes::enable(&cx, name),
            NodeCommand::Rotate { name } => nodes::rotate(&cx, name),
            NodeCommand::Update { name, endpoint, no_endpoint, mtu } => {
                let endpoint = match (endpoint, no_endpoint) {
                    (Some(endpoint), _) => Some(EndpointChange::Set(endpoint)),
                    (None, true) => Some(EndpointChange::Clear),
                    (None, false) => None,
                };
                if endpoint.is_none() && mtu.is_none() {
                    anyhow::bail!(
                        "node update {name}: nothing to change; give --endpoint HOST:PORT, --no-endpoint or --mtu N"
                    );
                }
                nodes::update(&cx, name, endpoint, mtu)
            }
        },
        Command::Access(command) => match command {
            AccessCommand::Allow { from, to } => access::allow(&cx, from, to),
            AccessCommand::Revoke { from, to } => access::revoke(&cx, from, to),
            AccessCommand::List => access::list(&cx),
        },
        Command::Apply { file, dry_run, out_dir, expires } => {
            commands::apply::apply(&cx, commands::apply::Apply { file, dry_run, out_dir, expires })
        }
        Command::Expose { service, https, relay, tls, tor: _, port, clients, qr, out_dir } => match (https, relay) {
            (Some(https), Some(relay)) => services::expose(&cx, service, https, relay, tls),
            _ => onion::expose_tor(&cx, service, port, clients, onion::ClientOut { qr, out_dir }),
        },
        Command::Unexpose { service, https, tor: _, clients } => match https {
            Some(https) => services::unexpose(&cx, service, https),
            None => onion::unexpose_tor(&cx, service, clients),
        },
        Command::Service(command) => match command {
            ServiceCommand::List { qr } => services::list(&cx, qr),
            ServiceCommand::Add { name, node, target, port, udp } => {
                let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
                services::add(&cx, name, node, target, port, protocol)
            }
            ServiceCommand::Update { name, target, port, udp, tcp } => {
                let protocol = match (udp, tcp) {
                    (true, _) => Some(Protocol::Udp),
                    (_, true) => Some(Protocol::Tcp),
                    _ => None,
                };
                services::update(&cx, name, target, port, protocol)
            }
            ServiceCommand::Remove { name } => services::remove(&cx, name),
        },
        Command::Device(command) => match command {
            DeviceCommand::List => devices::list(&cx),
            DeviceCommand::Add { name, allow, out } => devices::add(&cx, name, allow, out),
            DeviceCommand::Rotate { name, out } => devices::rotate(&cx, name, out),
            DeviceCommand::Remove { name } => devices::remove(&cx, name),
            DeviceCommand::Update { name, allow } => devices::update(&cx, name, allow),
        },
    }
}
