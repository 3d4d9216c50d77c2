//! The README's first command: `examples/quickstart.sh` provisions a network with SQLite state in a local
//! directory and prints a phone's QR code, without root; run again, it adds another phone. Run by a user,
//! it ends with the safe next step: the state handed to root (`/var/lib/meshd`, root's own) before root
//! runs the hub on it (issue 11, point 5).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use meshd_e2e::{bin_dir, meshctl, run_json};

fn quickstart(state: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.sh");
    // The binaries the tests use (the script would build them otherwise).
    Command::new("bash").arg(script).env("MESHD_BIN_DIR", bin_dir()).env("MESHD_STATE_DIR", state).output().unwrap()
}

/// Rows of the terminal QR code (half blocks, two modules per character row).
fn qr_rows(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.contains('▀')).count()
}

#[test]
fn quickstart_provisions_a_network_and_prints_a_phone_qr() {
    finds_the_binaries_under_cargo_target_dir();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("meshd-state");

    let first = quickstart(&state);
    let (stdout, stderr) = (String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&first.stderr));
    assert!(first.status.success(), "quickstart failed: {stderr}");
    assert!(stdout.contains("network home created"), "{stdout}");
    // The QR goes to stdout, what it is for to stderr.
    assert!(stderr.contains("device phone1: 10.77.0.3"), "{stderr}");
    assert!(stderr.contains("warning: the endpoint is the placeholder"), "no word about the placeholder: {stderr}");
    let next = format!("next: start the hub with  {}/meshd run --state-dir {}", bin_dir().display(), state.display());
    assert!(stderr.contains(&next), "{stderr}");
    assert!(qr_rows(&stdout) >= 20, "no QR code printed:\n{stdout}");
    for file in ["meshd.db", "private.key"] {
        let mode = std::fs::metadata(state.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }

    // Again: the same network, another phone.
    let second = quickstart(&state);
    let (stdout, stderr) = (String::from_utf8_lossy(&second.stdout), String::from_utf8_lossy(&second.stderr));
    assert!(second.status.success(), "second run failed: {stderr}");
    assert!(!stdout.contains("network home created") && stderr.contains("device phone2"), "{stdout}{stderr}");
    assert!(qr_rows(&stdout) >= 20);

    // A relative MESHD_STATE_DIR is the caller's, not the repository's; an endpoint given once the network
    // exists is not silently ignored.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.sh");
    let third = Command::new("bash")
        .arg(script)
        .current_dir(tmp.path())
        .env("MESHD_BIN_DIR", bin_dir())
        .env("MESHD_STATE_DIR", "meshd-state")
        .env("MESHD_ENDPOINT", "node.example.net:51820")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "third run failed: {stderr}");
    assert!(stderr.contains("device phone3") && stderr.contains("applies only when it is created"), "{stderr}");
    let devices = run_json(meshctl(&state).args(["device", "list", "--json"]));
    let names: Vec<&str> = devices.as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["phone1", "phone2", "phone3"]);
    assert!(devices.as_array().unwrap().iter().all(|d| d["allow"] == serde_json::json!(["wallet"])), "{devices}");
}

/// Rust developers often set `CARGO_TARGET_DIR`: the script finds the binaries it built wherever cargo put
/// them (here, the tests' own target directory reached through another path, so nothing is rebuilt and
/// `./target/debug` would be the wrong guess). Run before the other quickstart runs, never beside them:
/// should its `cargo build` have anything to do, it replaces the binaries they run.
fn finds_the_binaries_under_cargo_target_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let target = bin_dir().parent().unwrap().canonicalize().unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &elsewhere).unwrap();
    let state = tmp.path().join("meshd-state");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.sh");
    let out = Command::new("bash")
        .arg(script)
        .env_remove("MESHD_BIN_DIR")
        .env("CARGO_TARGET_DIR", &elsewhere)
        .env("MESHD_STATE_DIR", &state)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "quickstart with CARGO_TARGET_DIR failed: {stderr}");
    assert!(stderr.contains("device phone1"), "{stderr}");
    assert!(qr_rows(&stdout) >= 20, "no QR code printed:\n{stdout}");
}

/// As the README has it: the script run by a user (uid 65534 here), on binaries and a directory of theirs.
/// No root is needed, the state is the user's, and the next step it prints hands the state to root
/// before root runs the hub on it (`meshd run` as root refuses a state directory another user owns or
/// could swap: `planted_state.rs`).
#[test]
fn quickstart_as_a_user_needs_no_root_and_hands_the_state_to_root_before_the_hub_runs() {
    // Root only makes the user's directory and plays the user (setpriv).
    if !meshd_e2e::require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (repo, bin, home) = (tmp.path().join("repo"), tmp.path().join("bin"), tmp.path().join("home"));
    for dir in [repo.join("examples"), bin.clone(), home.clone()] {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let script = repo.join("examples/quickstart.sh");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.sh"), &script).unwrap();
    for name in ["meshd", "meshctl"] {
        std::fs::copy(bin_dir().join(name), bin.join(name)).unwrap();
    }
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let state = home.join("meshd-state");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
        .arg(&script)
        .current_dir(&home)
        .env("MESHD_BIN_DIR", &bin)
        .env("MESHD_STATE_DIR", "meshd-state")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "quickstart as a user failed: {stderr}");
    assert!(stdout.contains("network home created") && qr_rows(&stdout) >= 20, "{stdout}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(state.join("meshd.db")).unwrap().uid(), 65534, "the state is the user's");
    let next = format!(
        "  sudo mv -T {} /var/lib/meshd && sudo chown -R root: /var/lib/meshd && sudo {}/meshd run",
        state.display(),
        bin.display()
    );
    assert!(
        stderr.contains("next: hand the state to root and start the hub with") && stderr.contains(&next),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("sudo {}/meshctl", bin.display())), "{stderr}");
}
