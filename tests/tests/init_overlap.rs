//! `meshd init` refuses a mesh range that overlaps a network the host already routes, and leaves
//! nothing behind.
use meshd_e2e::{Netns, describe, output, product_bin, require_root, run_ok};

#[test]
fn init_refuses_a_range_the_host_already_uses() {
    if !require_root() {
        return;
    }
    let host = Netns::new("ovl");
    host.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"]);
    host.ip(&["addr", "add", "10.99.3.7/24", "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let init = |cidr: &str| {
        let mut cmd = host.command(product_bin("meshd"));
        cmd.args(["init", "--network", "home", "--name", "hub", "--endpoint", "10.99.3.7:51820", "--cidr", cidr]);
        cmd.arg("--state-dir").arg(&state);
        cmd
    };

    for cidr in ["10.99.0.0/16", "10.99.3.128/25"] {
        let out = output(&mut init(cidr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "init --cidr {cidr} was accepted: {}", describe(&out));
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("10.99.3.0/24") && stderr.contains("lan0"),
            "{stderr}"
        );
        assert!(!state.exists(), "a refused init must not create the state directory");
    }
    run_ok(&mut init("10.98.0.0/16"));
    assert!(state.join("meshd.db").exists());
}
