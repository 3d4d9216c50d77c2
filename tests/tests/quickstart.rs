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
    // Once the hub has that endpoint, giving it again is no reason for a warning.
    meshd_e2e::run_ok(meshctl(&state).args(["node", "update", "hub", "--endpoint", "node.example.net:51820"]));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.sh");
    let fourth = Command::new("bash")
        .arg(script)
        .env("MESHD_BIN_DIR", bin_dir())
        .env("MESHD_STATE_DIR", &state)
        .env("MESHD_ENDPOINT", "node.example.net:51820")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&fourth.stderr);
    assert!(fourth.status.success() && stderr.contains("device phone4"), "fourth run: {stderr}");
    assert!(!stderr.contains("warning"), "the endpoint given is the hub's: {stderr}");
    // Nor is the placeholder warned about once the hub has a real endpoint, however it got it.
    let fifth = quickstart(&state);
    let stderr = String::from_utf8_lossy(&fifth.stderr);
    assert!(fifth.status.success() && stderr.contains("device phone5"), "fifth run: {stderr}");
    assert!(!stderr.contains("warning"), "the hub's endpoint is no placeholder any more: {stderr}");
    let devices = run_json(meshctl(&state).args(["device", "list", "--json"]));
    let names: Vec<&str> = devices.as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["phone1", "phone2", "phone3", "phone4", "phone5"]);
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
    let (state, bin, stderr) = quickstart_as_a_user(tmp.path());
    let next = format!(
        "  sudo mkdir -m 0700 /var/lib/meshd && sudo cp -RT {0} /var/lib/meshd && rm -rf {0} && sudo {1}/meshd run",
        state.display(),
        bin.display()
    );
    assert!(
        stderr.contains("next: hand the state to root and start the hub with") && stderr.contains(&next),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("sudo {}/meshctl", bin.display())), "{stderr}");
}

/// What the user keeps running across the hand-over: the database and the key opened for writing before
/// it; once `go` exists, it writes through both descriptors and says how many bytes each write took.
const HOLD_OPEN: &str = r#"
import os, sys, time
state, go = sys.argv[1], sys.argv[2]
db = os.open(state + "/meshd.db", os.O_RDWR)
key = os.open(state + "/private.key", os.O_RDWR)
print("open", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
print("db", os.pwrite(db, b"X" * 100, 0), "key", os.pwrite(key, b"A" * 8, 0), flush=True)
"#;

/// Before the fix the hand-over was `mv` and `chown`: the same files, so a descriptor the user opened
/// before it kept writing root's database and key (issue 11, finding F10). The hand-over the script prints
/// (carried out as printed, on a temporary path for `/var/lib/meshd`) copies into new files: what the user
/// writes through the old descriptors changes nothing of root's copy, which serves as before.
#[test]
fn a_descriptor_the_user_opened_before_the_hand_over_cannot_change_roots_copy() {
    if !meshd_e2e::require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (state, _, stderr) = quickstart_as_a_user(tmp.path());
    let go = tmp.path().join("go");
    let log = tmp.path().join("holder.log");
    let mut holder = Command::new("setpriv");
    holder.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", HOLD_OPEN]);
    holder.arg(&state).arg(&go);
    let holder = meshd_e2e::Proc::spawn_logged(holder, "the user's open files", &log);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(meshd_e2e::wait_until(std::time::Duration::from_secs(10), || said().contains("open")), "{}", said());

    // The hand-over as printed, less the start of the hub, with a temporary directory for /var/lib/meshd.
    let line = stderr.lines().find(|l| l.contains("/var/lib/meshd")).expect("the hand-over line");
    let target = tmp.path().join("var-lib-meshd");
    let hand_over = line.trim().replace("sudo ", "").replace("/var/lib/meshd", &target.display().to_string());
    let hand_over = hand_over.rsplit_once(" && ").expect("ends with the start of the hub").0;
    let out = Command::new("sh").args(["-c", hand_over]).current_dir(tmp.path()).output().unwrap();
    assert!(out.status.success(), "{hand_over}: {}", meshd_e2e::describe(&out));
    use std::os::unix::fs::MetadataExt;
    for name in ["meshd.db", "private.key"] {
        let meta = std::fs::metadata(target.join(name)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "{name} after the hand-over");
    }
    let (db, key) =
        (std::fs::read(target.join("meshd.db")).unwrap(), std::fs::read(target.join("private.key")).unwrap());

    std::fs::write(&go, "").unwrap();
    assert!(meshd_e2e::wait_until(std::time::Duration::from_secs(10), || said().contains("db ")), "{}", said());
    assert!(said().contains("db 100 key 8"), "the user's writes went nowhere? {}", said());
    drop(holder);
    assert!(std::fs::read(target.join("meshd.db")).unwrap() == db, "the user changed root's database");
    assert!(std::fs::read(target.join("private.key")).unwrap() == key, "the user changed root's key");
    let devices = run_json(meshctl(&target).args(["device", "list", "--json"]));
    assert_eq!(devices[0]["name"], "phone1", "{devices}");
}

/// Runs the quickstart script as uid 65534 in a home directory of its own under `root`, on copies of
/// the binaries; returns the state directory, the binaries' directory and what the script said on stderr.
fn quickstart_as_a_user(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (repo, bin, home) = (root.join("repo"), root.join("bin"), root.join("home"));
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
    (state, bin, stderr.into_owned())
}
