//! Issue 8, point 10: like every Unix tool, `meshctl` and `meshd`'s commands exit quietly when their
//! output is closed early (`meshctl --json service list | head -1`, `| grep -q`, `| true`): no panic,
//! no message, no change left half-made.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use meshd_e2e::{init_network, meshctl, product_bin, run_json, run_ok};

/// Runs `cmd` with standard output a pipe whose reader is already gone; returns its exit status and
/// standard error. The child's first write fails at once (EPIPE), however little it writes.
fn with_closed_stdout(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = cmd.stdin(Stdio::null()).stdout(writer).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (child.wait().unwrap(), stderr)
}

/// Quiet: ended by SIGPIPE as `cat` or `ls` would be (or done before writing), and nothing on stderr
/// beyond what the command says on success.
fn assert_quiet(what: &str, status: std::process::ExitStatus, stderr: &str) {
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{what}: {stderr}");
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{what}: ended with {status:?}, not quietly: {stderr}"
    );
}

#[test]
fn commands_exit_quietly_when_their_reader_stops_early() {
    let dir = init_network(&[]);
    let state = dir.path();
    run_ok(meshctl(state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    run_ok(meshctl(state).args(["device", "add", "phone", "--allow", "wallet"]));

    for args in [
        &["--json", "service", "list"][..],
        &["service", "list"],
        &["device", "list"],
        &["--json", "node", "list"],
        &["status"],
        &["--help"],
    ] {
        let (status, stderr) = with_closed_stdout(meshctl(state).args(args));
        assert_quiet(&format!("meshctl {args:?}"), status, &stderr);
    }
    let (status, stderr) = with_closed_stdout(Command::new(product_bin("meshd")).arg("--version"));
    assert_quiet("meshd --version", status, &stderr);

    // A device added while the reader of its config is gone: the config cannot be handed out, so the
    // device is not added, the file staged next to `--conf` is not left behind (it holds the private
    // key), and meshctl says so in one line.
    let conf = state.join("tablet.conf");
    for extra in [&[][..], &["--conf".as_ref(), conf.as_os_str(), "--qr".as_ref()]] {
        let (status, stderr) =
            with_closed_stdout(meshctl(state).args(["device", "add", "tablet", "--allow", "wallet"]).args(extra));
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(status.code(), Some(1), "{status:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains("standard output"), "{stderr}");
        let devices = run_json(meshctl(state).args(["device", "list", "--json"]));
        let names: Vec<&str> = devices.as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
        assert_eq!(names, ["phone"], "a device whose config went nowhere is still registered");
        let left: Vec<_> = std::fs::read_dir(state).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().contains("tablet")), "left behind: {left:?}");
    }
    run_ok(meshctl(state).args(["device", "add", "tablet", "--allow", "wallet"]));
}
