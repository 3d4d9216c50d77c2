//! Handing out a device's config: a failed write changes nothing and loses no key (on a really full
//! file system, offline and through a running daemon), output paths are written and never replaced
//! (symbolic links, FIFOs, `/proc/self/fd/1`, `-`, device nodes), configs without DNS or with other
//! resolvers, and config files named as the WireGuard apps import them.
//!
//! Needs `wg` and `wg-quick` (wireguard-tools); the full-file-system and device-node tests need root.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshd_e2e::{
    Netns, Proc, UapiCleanup, WgQuick, assert_error_line, describe, init_network, meshctl, output, product_bin,
    require_root, run_json, run_ok, unique_ifname, wait_until, wg_pubkey,
};
use serde_json::Value;

/// A state dir for network `home` (hub `hub`, 10.77.0.1) with a service `svc` (10.77.0.2).
fn state_with_service(extra: &[&str]) -> tempfile::TempDir {
    let dir = init_network(extra);
    run_ok(meshctl(dir.path()).args(["service", "add", "svc", "--node", "hub", "--target", "127.0.0.1:8080"]));
    dir
}

fn devices(state: &Path) -> Value {
    run_json(meshctl(state).args(["--json", "device", "list"]))
}

/// The device named `name` in `devices`.
fn device<'a>(devices: &'a Value, name: &str) -> &'a Value {
    devices
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {devices}"))
}

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A 16 KiB tmpfs mounted on a new directory and filled up; unmounted on drop.
struct FullFs {
    _parent: tempfile::TempDir,
    dir: PathBuf,
}

impl FullFs {
    fn new() -> FullFs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("full");
        fs::create_dir(&dir).unwrap();
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"]).arg(&dir));
        let full = FullFs { _parent: parent, dir };
        // Fill it: the write stops at ENOSPC, which is the point.
        let _ = fs::write(full.dir.join("filler"), vec![0u8; 64 * 1024]);
        assert!(fs::write(full.dir.join("probe"), b"x").is_err(), "the tmpfs is not full");
        let _ = fs::remove_file(full.dir.join("probe"));
        full
    }
}

impl Drop for FullFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// What must not change when a hand-out fails: the device list (keys, addresses, grants) and the
/// files of the output directory.
fn failed_hand_outs_change_nothing(state: &Path, full: &Path, ok_dir: &Path) {
    let before = devices(state);
    let files_before = entries(full);

    // A new device whose config cannot be written: not added, its address not taken.
    let conf = full.join("phone.conf");
    let out = output(meshctl(state).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(&conf));
    assert_error_line(&out, &["phone.conf", "No space left on device"]);
    assert_eq!(devices(state), before, "a device add that could not write its config changed the devices");
    assert_eq!(entries(full), files_before, "a file was left behind");
    for qr in ["--qr-png", "--qr-svg"] {
        let out =
            output(meshctl(state).args(["device", "add", "phone", "--allow", "svc", qr]).arg(full.join("phone.qr")));
        assert_error_line(&out, &["phone.qr"]);
        assert_eq!(devices(state), before, "{qr}");
        assert_eq!(entries(full), files_before, "{qr}");
    }

    // An immediate retry elsewhere gets the name and the very address the failed one would have had.
    let good = ok_dir.join("phone.conf");
    run_ok(meshctl(state).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(&good));
    let added = devices(state);
    let phone = device(&added, "phone");
    assert_eq!(phone["address"], "10.77.0.3", "{added}");
    let old = WgQuick::parse(&fs::read_to_string(&good).unwrap());
    assert_eq!(phone["public_key"].as_str(), Some(wg_pubkey(&old.private_key).as_str()));

    // A rotation that cannot write its config keeps the old key: the phone's config keeps working.
    let out = output(meshctl(state).args(["device", "rotate", "phone", "--conf"]).arg(&conf));
    assert_error_line(&out, &["phone.conf", "No space left on device"]);
    assert_eq!(devices(state), added, "a rotation that could not write its config changed the key");
    assert_eq!(entries(full), files_before);

    // And a rotation that can write replaces it.
    run_ok(meshctl(state).args(["device", "rotate", "phone", "--conf"]).arg(&good));
    let new = WgQuick::parse(&fs::read_to_string(&good).unwrap());
    let rotated = devices(state);
    assert_eq!(device(&rotated, "phone")["public_key"].as_str(), Some(wg_pubkey(&new.private_key).as_str()));
    assert_ne!(new.private_key, old.private_key);
}

#[test]
fn a_full_file_system_changes_nothing_and_loses_no_key_offline() {
    if !require_root() {
        return;
    }
    let state = state_with_service(&[]);
    let full = FullFs::new();
    let ok = tempfile::tempdir().unwrap();
    failed_hand_outs_change_nothing(state.path(), &full.dir, ok.path());
}

#[test]
fn a_full_file_system_changes_nothing_and_loses_no_key_with_a_running_daemon() {
    if !require_root() {
        return;
    }
    let node = Netns::new("handout");
    let ifname = unique_ifname("mh");
    let _uapi = UapiCleanup(ifname.clone());
    let state = state_with_service(&["--interface", &ifname]);
    let log = state.path().join("meshd.log");
    let mut cmd = node.command(product_bin("meshd"));
    cmd.args(["run", "--wireguard", "userspace", "--state-dir"]).arg(state.path());
    let mut daemon = Proc::spawn_logged(cmd, "meshd run", &log);
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting up");
        std::os::unix::net::UnixStream::connect(state.path().join("meshd.sock")).is_ok()
    });
    assert!(ready, "meshd run did not become ready");
    let peers = || node.run(&["wg", "show", &ifname, "peers"]);
    let full = FullFs::new();
    let ok = tempfile::tempdir().unwrap();

    let before = peers();
    let out = output(
        meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(full.dir.join("p.conf")),
    );
    assert_error_line(&out, &["No space left on device"]);
    assert_eq!(peers(), before, "the interface gained a peer for a device whose config was not written");

    failed_hand_outs_change_nothing(state.path(), &full.dir, ok.path());
    let phone = device(&devices(state.path()), "phone")["public_key"].as_str().unwrap().to_owned();
    assert!(peers().contains(&phone), "the rotated key is not on the interface: {}", peers());
    daemon.assert_running("after the hand-outs");
}

#[test]
fn a_symbolic_link_is_refused_and_its_target_untouched() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("precious");
    fs::write(&target, "precious data").unwrap();
    let link = tmp.path().join("phone.conf");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = tmp.path().join("dangling.conf");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let before = devices(state.path());
    for path in [&link, &dangling] {
        let out = output(meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(path));
        assert_error_line(&out, &["symbolic link"]);
        assert!(fs::symlink_metadata(path).unwrap().file_type().is_symlink(), "{} was replaced", path.display());
    }
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious data");
    assert!(!tmp.path().join("nowhere").exists());
    assert_eq!(devices(state.path()), before);
    assert_eq!(entries(tmp.path()), ["dangling.conf", "phone.conf", "precious"]);
}

#[test]
fn a_fifo_gets_the_config_and_stays_a_fifo() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("phone.conf");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            fs::File::open(&fifo).unwrap().read_to_string(&mut text).unwrap();
            text
        })
    };
    run_ok(meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(&fifo));
    // Checked before waiting for the reader, which waits forever if the FIFO was replaced.
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    let text = reader.join().unwrap();
    let conf = WgQuick::parse(&text);
    let list = devices(state.path());
    assert_eq!(device(&list, "phone")["public_key"].as_str(), Some(wg_pubkey(&conf.private_key).as_str()), "{text}");
    assert_eq!(entries(tmp.path()), ["phone.conf"], "no temporary file left behind");
}

#[test]
fn a_link_to_standard_output_and_dash_print_the_config() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("stdout");
    std::os::unix::fs::symlink("/proc/self/fd/1", &link).unwrap();
    let printed = run_ok(meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(&link));
    let conf = WgQuick::parse(&printed);
    assert_eq!(
        device(&devices(state.path()), "phone")["public_key"].as_str(),
        Some(wg_pubkey(&conf.private_key).as_str()),
        "{printed}"
    );
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("/proc/self/fd/1"), "the link was replaced");

    let printed = run_ok(meshctl(state.path()).args(["device", "rotate", "phone", "--conf", "-"]));
    let conf = WgQuick::parse(&printed);
    assert_eq!(
        device(&devices(state.path()), "phone")["public_key"].as_str(),
        Some(wg_pubkey(&conf.private_key).as_str()),
        "{printed}"
    );
    assert!(!Path::new("-").exists());
}

#[test]
fn an_existing_file_is_replaced_whole_and_private() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("phone.conf");
    fs::write(&conf, "old").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
    run_ok(meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(&conf));
    assert_eq!(fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(fs::read_to_string(&conf).unwrap().contains("[Peer]"));
    assert_eq!(entries(tmp.path()), ["phone.conf"]);
}

#[test]
fn device_nodes_are_written_in_place_and_a_failing_one_changes_nothing() {
    if !require_root() {
        return;
    }
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    // Our own nodes for the null and the full device, in a temp dir: the machine's /dev stays out of it.
    let null = tmp.path().join("null");
    let full = tmp.path().join("full");
    run_ok(Command::new("mknod").arg(&null).args(["c", "1", "3"]));
    run_ok(Command::new("mknod").arg(&full).args(["c", "1", "7"]));

    let before = devices(state.path());
    let out = output(meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--conf"]).arg(&full));
    assert_error_line(&out, &["No space left on device"]);
    assert_eq!(devices(state.path()), before, "a device whose config went nowhere was added");

    run_ok(meshctl(state.path()).args(["device", "add", "phone", "--allow", "svc", "--qr-png"]).arg(&null));
    for node in [&null, &full] {
        let kind = fs::symlink_metadata(node).unwrap().file_type();
        assert!(kind.is_char_device(), "{} is no longer a character device", node.display());
    }
    assert_eq!(entries(tmp.path()), ["full", "null"]);
}

#[test]
fn configs_without_dns_or_with_other_resolvers() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let strip = |path: &Path| run_ok(Command::new("wg-quick").arg("strip").arg(path));

    let router = tmp.path().join("router.conf");
    run_ok(
        meshctl(state.path()).args(["device", "add", "router", "--allow", "svc", "--no-dns", "--conf"]).arg(&router),
    );
    let text = fs::read_to_string(&router).unwrap();
    assert!(!text.to_ascii_lowercase().contains("dns"), "{text}");
    assert!(strip(&router).contains("PrivateKey"));

    let laptop = tmp.path().join("laptop.conf");
    let cmd = meshctl(state.path())
        .args(["device", "add", "laptop", "--allow", "svc", "--dns", "192.168.1.1,2001:db8::53", "--conf"])
        .arg(&laptop)
        .output()
        .unwrap();
    assert!(cmd.status.success(), "{}", describe(&cmd));
    let conf = WgQuick::parse(&fs::read_to_string(&laptop).unwrap());
    assert_eq!(conf.dns_servers, ["192.168.1.1".parse::<std::net::IpAddr>().unwrap(), "2001:db8::53".parse().unwrap()]);
    assert!(conf.dns_search.is_empty(), "{:?}", conf.dns_search);
    strip(&laptop);

    // A rotation takes the same choice; the default is the hub's DNS.
    let printed = run_ok(meshctl(state.path()).args(["device", "rotate", "router", "--no-dns"]));
    assert!(!printed.contains("DNS"), "{printed}");
    let printed = run_ok(meshctl(state.path()).args(["device", "rotate", "router"]));
    assert!(printed.contains("DNS = 10.77.0.1, "), "{printed}");

    let before = devices(state.path());
    let both =
        output(meshctl(state.path()).args(["device", "add", "x", "--allow", "svc", "--no-dns", "--dns", "1.1.1.1"]));
    assert_eq!(both.status.code(), Some(2), "{}", describe(&both));
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"), "{}", describe(&both));
    let bad = output(meshctl(state.path()).args(["device", "add", "x", "--allow", "svc", "--dns", "1.2.3"]));
    assert_eq!(bad.status.code(), Some(2), "{}", describe(&bad));
    assert_eq!(devices(state.path()), before);
}

#[test]
fn apply_names_config_files_as_the_apps_import_them_and_honours_dns() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("net.toml");
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(
        &file,
        r#"
[[service]]
name = "svc"
node = "hub"
target = "127.0.0.1:8080"

[[device]]
name = "grandmas-living-room-tablet"
allow = ["svc"]
dns = false

[[device]]
name = "phone"
allow = ["svc"]
dns = ["192.168.1.1"]
"#,
    )
    .unwrap();
    let report = run_json(meshctl(state.path()).arg("--json").arg("apply").arg(&file).arg("--out-dir").arg(&out));
    let files = entries(&out);
    assert_eq!(files.len(), 2, "{files:?}");
    for name in &files {
        let stem = name.strip_suffix(".conf").unwrap();
        assert!(
            (1..=15).contains(&stem.len()) && stem.chars().all(|c| c.is_ascii_alphanumeric() || "_=+.-".contains(c)),
            "{name} is not a tunnel name the apps import"
        );
    }
    let tablet =
        files.iter().find(|f| f.starts_with("grandmas-")).expect("the tablet's file keeps its first characters");
    let configs = report["configs"].as_array().unwrap();
    let path_of = |device: &str| {
        configs.iter().find(|c| c["device"] == device).and_then(|c| c["path"].as_str()).unwrap().to_owned()
    };
    assert!(path_of("grandmas-living-room-tablet").ends_with(tablet.as_str()), "{report}");
    let text = fs::read_to_string(out.join(tablet)).unwrap();
    assert!(!text.contains("DNS"), "{text}");
    let phone = fs::read_to_string(out.join("phone.conf")).unwrap();
    assert!(phone.contains("DNS = 192.168.1.1\n"), "{phone}");
}

/// `apply` writes each config to a new file only: a FIFO, a device node or a link to one already at
/// the path (where the report would claim the config went) is refused before anything changes, as an
/// existing file is. `--conf` naming a directory-to-be (`newdir/`) is refused before the device is added.
#[test]
fn apply_refuses_any_existing_path_and_conf_refuses_a_directory_path() {
    let state = state_with_service(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let file = tmp.path().join("net.toml");
    fs::write(&file, "[[service]]\nname = \"svc\"\nnode = \"hub\"\ntarget = \"127.0.0.1:8080\"\n[[device]]\nname = \"newdev\"\nallow = [\"svc\"]\n").unwrap();
    let fifo = out.join("newdev.conf");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let refused = output(meshctl(state.path()).arg("apply").arg(&file).arg("--out-dir").arg(&out));
    assert_error_line(&refused, &["newdev.conf", "exists"]);
    assert_eq!(devices(state.path()), serde_json::json!([]), "the device was added");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    fs::remove_file(&fifo).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &fifo).unwrap();
    let refused = output(meshctl(state.path()).arg("apply").arg(&file).arg("--out-dir").arg(&out));
    assert_error_line(&refused, &["newdev.conf", "exists"]);
    assert_eq!(devices(state.path()), serde_json::json!([]));

    let dir_path = tmp.path().join("newdir/");
    let refused =
        output(meshctl(state.path()).args(["device", "add", "d1", "--allow", "svc", "--conf"]).arg(&dir_path));
    assert_error_line(&refused, &["not a file path"]);
    assert_eq!(devices(state.path()), serde_json::json!([]), "the device was added");
    assert_eq!(entries(tmp.path()), ["net.toml", "out"], "a file was left behind");
}
