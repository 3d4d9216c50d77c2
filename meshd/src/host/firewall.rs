//! Loading a host's access rules (rendered by [`meshd_core::plan::nftables`]) into nftables: one
//! `nft -f -` transaction, so a change replaces the whole table atomically; and listing the table as it is
//! in force, to notice it removed or changed by something else.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use meshd_core::plan::nftables::table_name;
use meshd_core::session::rules::Listing;

/// Loading the ruleset failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running nft (install nftables): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Rejected(String),
}

/// Load `script` with `nft -f -`. What nft says on failure is the error, even when it stopped reading
/// the script early.
pub async fn load(script: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Spawn)?;
    let mut written = Ok(());
    if let Some(mut stdin) = child.stdin.take() {
        written = stdin.write_all(script.as_bytes()).await;
    }
    let output = child.wait_with_output().await.map_err(FirewallError::Spawn)?;
    if output.status.success() {
        written.map_err(FirewallError::Spawn)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(FirewallError::Rejected(stderr.lines().next().unwrap_or("unknown error").to_owned()))
    }
}

/// The table of `interface` as it is in force, without counters (`nft -s list table`) nor the elements of
/// dynamic sets (which the packet path fills: the mesh DNS's TCP connections counted per source): the same
/// text as long as nobody changes it; [`Listing::Missing`] when nft says there is no such table. Err when nft could
/// not tell (it could not be started: no descriptors left, not installed), which says nothing of the table.
pub async fn list(interface: &str) -> Result<Listing, FirewallError> {
    let table = table_name(interface);
    let output = Command::new("nft")
        .args(["-s", "list", "table", "inet", &table])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(FirewallError::Spawn)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        Ok(Listing::Table(without_dynamic_elements(&String::from_utf8_lossy(&output.stdout))))
    } else if stderr.contains("No such file or directory") {
        Ok(Listing::Missing)
    } else {
        Err(FirewallError::Rejected(stderr.lines().next().unwrap_or("unknown error").to_owned()))
    }
}

/// `listing` without the `elements = { ... }` of its sets flagged `dynamic` (one line, or several when
/// nft wraps a long list).
fn without_dynamic_elements(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    let mut set: Vec<&str> = Vec::new();
    for line in listing.lines() {
        let trimmed = line.trim();
        if set.is_empty() && !(trimmed.starts_with("set ") && trimmed.ends_with('{')) {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        set.push(line);
        if trimmed != "}" {
            continue;
        }
        let dynamic = set.iter().any(|l| l.trim() == "flags dynamic");
        let mut in_elements = false;
        for l in set.drain(..) {
            let t = l.trim();
            if dynamic && (in_elements || t.starts_with("elements = {")) {
                in_elements = !t.ends_with('}');
                continue;
            }
            out.push_str(l);
            out.push('\n');
        }
    }
    for l in set {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Remove the table of `interface` (on shutdown).
pub async fn remove(interface: &str) -> Result<(), FirewallError> {
    let table = table_name(interface);
    load(&format!("table inet {table}\ndelete table inet {table}\n")).await
}

#[cfg(test)]
mod tests {
    use meshd_core::fixtures::{sample_host_plan, with_udp_echo};
    use meshd_core::plan::nftables::render;

    use super::*;

    /// What the packet path adds to a dynamic set is not a change of the table; elements of other sets are.
    #[test]
    fn a_listing_leaves_out_the_elements_of_dynamic_sets_only() {
        let listing = "table inet meshd_x {
\tset devices_v4 {
\t\ttype ipv4_addr
\t\telements = { 10.77.0.4, 10.77.0.7 }
\t}

\tset dns_tcp_v4 {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic
\t\telements = { 10.77.0.4 ct count over 8,
\t\t\t     10.77.0.7 ct count over 8 }
\t}

\tset dns_tcp_v6 {
\t\ttype ipv6_addr
\t\tsize 65535
\t\tflags dynamic
\t\telements = { fd00::4 ct count over 8 }
\t}

\tchain dns_tcp {
\t\tmeta l4proto tcp ct count over 64 reject with tcp reset
\t}
}
";
        let quiet = listing
            .replace("\t\telements = { 10.77.0.4 ct count over 8,\n\t\t\t     10.77.0.7 ct count over 8 }\n", "")
            .replace("\t\telements = { fd00::4 ct count over 8 }\n", "");
        assert_eq!(without_dynamic_elements(listing), quiet);
        assert!(quiet.contains("elements = { 10.77.0.4, 10.77.0.7 }"), "a static set keeps its elements");
        assert_eq!(without_dynamic_elements(&quiet), quiet);
    }

    /// The rendered script must be accepted by the real nft parser (`nft -c` checks without loading).
    #[test]
    fn nft_accepts_the_ruleset() {
        let Ok(out) =
            std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().expect("piped").write_all(
                        render(&with_udp_echo(sample_host_plan(&["10.77.0.4", "fd00::4"], true))).as_bytes(),
                    )?;
                    child.wait_with_output()
                })
        else {
            assert!(std::env::var_os("CI").is_none(), "nft must be installed in CI");
            eprintln!("nft not installed: skipping the parser check");
            return;
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("Operation not permitted") {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("not root: skipping the nft parser check");
            return;
        }
        assert!(out.status.success(), "nft -c rejected the ruleset: {stderr}");
    }
}
