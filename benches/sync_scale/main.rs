//! Live updates at scale: how long one change takes to reach N member hosts, and what it costs the
//! controller. The figures are recorded in docs/PERFORMANCE.md, "Live updates at scale (sync)".
//!
//! One binary in three roles (it runs itself):
//! - the driver (no role argument) runs one controller process per host count and prints the tables;
//! - `controller` serves a `meshd::links::sync::Publisher` over a state of N member nodes on 127.0.0.1, publishes
//!   changes and measures; the process holds nothing else, so its CPU time and memory are the controller's;
//! - `clients` runs N light members in one process, each a TCP session from its own mesh address: the
//!   network is 127.0.0.0/8, so member index `i` is 127.0.0.0 + i, and Linux routes all of it to `lo`.
//!
//! Every member parses every `Changes` line and checks that it follows the previous one; FULL_MEMBERS
//! of them also keep a whole copy of the state, apply each change with `meshd_core::wire::sync::apply` and finally check
//! their copy's digest against the controller's (a copy for every member would need N copies of an
//! N-node state, an estimated 30 GB at 10,000).
//!
//! Run: `cargo bench -p meshd-e2e --bench sync_scale [-- --hosts 100,1000,10000 --changes 20 --no-reference]`
//! (needs a hard limit of open files above the largest host count: each process holds one socket per member).

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, mpsc as std_mpsc};
use std::time::Duration;

use meshd::links::sync::Publisher;
use meshd_core::input::Label;
use meshd_core::keys::PrivateKey;
use meshd_core::model::{AccessRule, DeviceGrants, Network, Node, Protocol, Role, Service, SharedState};
use meshd_core::wire::auth::{Challenge, Handshake, HubAnswer, MemberProof};
use meshd_core::wire::sync::{self, ToHub, ToMember};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Semaphore, broadcast, mpsc};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DEFAULT_HOSTS: [usize; 3] = [100, 1_000, 10_000];
const DEFAULT_CHANGES: usize = 20;
/// Members that keep a whole copy of the state and apply every change to it.
const FULL_MEMBERS: usize = 16;
/// Connections being opened at once (below the listener's backlog of 1024).
const CONNECTING: usize = 256;
/// Longest wait for the clients to report a step.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Runs of each single-shot timing (serialising, digesting), of which the median is kept.
const REPEATS: usize = 5;
/// Worker threads of each process's runtime (the machine the figures were taken on has 2 cores).
const WORKERS: usize = 2;

mod clients;
mod controller;
mod driver;
mod measure;
mod network;

use clients::*;
use controller::*;
use driver::*;
use measure::*;
use network::*;

fn main() {
    // `cargo bench` passes `--bench`.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let result = match args.first().map(String::as_str) {
        Some("controller") => controller(&args[1..]),
        Some("clients") => clients(&args[1..]),
        _ => driver(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn number(args: &[String], name: &str, default: usize) -> Result<usize> {
    match flag(args, name) {
        Some(text) => Ok(text.replace('_', "").parse().map_err(|e| format!("{name} {text:?}: {e}"))?),
        None => Ok(default),
    }
}

fn required<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    Ok(flag(args, name).ok_or_else(|| format!("{name} is missing"))?)
}
