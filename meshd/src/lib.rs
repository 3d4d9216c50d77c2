//! meshd: a self-hosted WireGuard mesh and remote-access provisioner, the daemon and its controller.
//! What to do is decided in [`meshd_core`], without I/O; this crate carries it out.
//!
//! Data flows one way: `meshctl` -> [`links::admin`] socket (or the controller in-process, under the
//! offline lock) -> [`controller`] (and its [`controller::store`]) -> the network's state ->
//! [`meshd_core::plan`] -> [`meshd_core::reconcile`] steps -> [`runtime`] -> the host edges in [`host`]
//! (WireGuard, nftables, forwarders, DNS).
//!
//! - [`controller`]: the network's records in SQLite, and every change to them.
//! - [`runtime`]: the daemon's loops: the hub, a member, and the executor of host steps.
//! - [`links`]: the sockets between processes and hosts: admin (local), join (TLS), sync (in the mesh).
//! - [`host`]: one module per outside system the daemon touches.
//! - `fuzzing` (feature `fuzzing`): fuzz targets for the parsers behind I/O (see docs/FUZZING.md).

pub mod controller;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod host;
pub mod links;
pub mod relay;
pub mod runtime;

/// Log to stderr; `RUST_LOG` sets the filter (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // defguard_wireguard_rs logs an ERROR when the kernel module is missing, before meshd falls back
        // to its embedded WireGuard (and says so): not a failure, so not shown unless RUST_LOG asks. Its INFO
        // lines (a whole peer dump per change, "assigned the following addresses: []" while meshd adds them
        // itself) and boringtun's say what meshd's own lines say better: warnings only.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,hickory_server=warn,defguard_wireguard_rs=warn,defguard_wireguard_rs::netlink=off,\
                 defguard_boringtun=warn",
            )
        });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Let a closed standard output end the process quietly, as Unix tools do (`meshctl ... | head`).
/// Rust starts programs with SIGPIPE ignored, so a write to a closed pipe fails and `println!`
/// panics. For the command-line programs only: the daemon keeps ignoring SIGPIPE, since a client
/// that goes away must never end it. Sockets these programs write to are written with `MSG_NOSIGNAL`
/// (see [`links::admin::call`]), so a daemon that goes away mid-request is still reported as an error.
pub fn exit_quietly_on_closed_output() {
    // SAFETY: signal(2) with the default action; called at the start of main, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Parse the command line; a usage error is printed as one line (`error: ...`) and exits with 2.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let mut lines = rendered.lines();
            let mut first = lines.next().unwrap_or("error: invalid arguments").to_owned();
            // clap lists what is missing on the lines after a colon: keep them on the one line.
            if first.ends_with(':') {
                let listed: Vec<&str> =
                    lines.map(str::trim).take_while(|l| !l.is_empty() && !l.starts_with("Usage:")).collect();
                first = format!("{first} {}", listed.join(", "));
            }
            eprintln!("{first}");
            std::process::exit(2);
        }
    }
}
