//! Issue 10, point 8: `meshd join` checks the mesh range as `meshd init` does, before the token is spent.
//!
//! A hub with the range 10.99.0.0/16, and a host whose LAN (`lan0`, 10.99.3.7/24) lies inside it: its
//! join is refused in one line naming the interface and the network, nothing is written in its state
//! directory, and the invite stays pending; the same token then joins a host without the overlap.
//! (Before the fix the join went through silently and the member was cut off from the hub.) A token of a
//! controller from before tokens carried the range is still read; the overlap is then caught when the
//! token is spent, and the error says how to clean up.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshd_e2e::{MeshHost, assert_refused, describe, meshctl, require_root, run_json, run_ok, veth};
use serde_json::Value;

/// The same token as a controller from before the range was carried wrote it.
fn without_range(token: &str) -> String {
    let body = token.strip_prefix("meshd-invite:").unwrap();
    let mut json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
    assert_eq!(json["cidr"], "10.99.0.0/16", "the token carries the network's range: {json}");
    json.as_object_mut().unwrap().remove("cidr");
    format!("meshd-invite:{}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json).unwrap()))
}

fn pending(hub: &MeshHost) -> Vec<String> {
    let invites = run_json(meshctl(&hub.state).args(["node", "invites", "--json"]));
    invites.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn join_refuses_a_range_the_host_already_routes_before_the_token_is_spent() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "jo");
    let lan = MeshHost::new("lan", root, "jo");
    let clean = MeshHost::new("clean", root, "jo");
    veth(&hub.ns, &lan.ns, "172.31.244.1/24", "172.31.244.2/24");
    veth(&hub.ns, &clean.ns, "172.31.245.1/24", "172.31.245.2/24");
    clean.ns.ip(&["route", "add", "default", "via", "172.31.245.1"]);
    // The host's LAN lies inside the mesh range.
    lan.ns.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"]);
    lan.ns.ip(&["addr", "add", "10.99.3.7/24", "dev", "lan0"]);
    lan.ns.ip(&["link", "set", "lan0", "up"]);

    hub.init_hub("172.31.244.1:51820", &["--cidr", "10.99.0.0/16"]);
    let _hub_daemon = hub.run_hub(&root.join("hub.log"));

    let token = run_ok(meshctl(&hub.state).args(["node", "invite", "member"])).trim().to_owned();
    let out = lan.join(&token, &lan.state, None);
    assert_refused(&out, &["lan0", "10.99.3.0/24", "network home", "10.99.0.0/16"]);
    assert!(!lan.state.exists(), "a refused join wrote {}", lan.state.display());
    assert_eq!(pending(&hub), ["member"], "the refused join spent the token");

    // A host where a mesh on that very range already runs is told so.
    lan.ns.ip(&["link", "add", "mesh0", "type", "veth", "peer", "name", "mesh1"]);
    lan.ns.ip(&["addr", "add", "10.99.0.5/16", "dev", "mesh0"]);
    lan.ns.ip(&["link", "set", "mesh0", "up"]);
    let out = lan.join(&token, &lan.state, None);
    assert_refused(&out, &["mesh0", "10.99.0.0/16", "runs here already"]);
    assert_eq!(pending(&hub), ["member"], "the refused join spent the token");
    lan.ns.ip(&["link", "del", "mesh0"]);

    // The same token joins a host without the overlap.
    let out = clean.join(&token, &clean.state, None);
    assert!(out.status.success(), "the token no longer works: {}", describe(&out));
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    assert!(nodes.as_array().unwrap().iter().any(|n| n["name"] == "member"), "{nodes}");

    // An older token (no range in it) still reads; the overlap is caught once it is spent, and the error
    // says what to remove.
    let old = without_range(run_ok(meshctl(&hub.state).args(["node", "invite", "old"])).trim());
    let out = lan.join(&old, &lan.state, None);
    assert_refused(&out, &["lan0", "10.99.3.0/24", "meshctl node remove old"]);
    assert!(!lan.state.exists(), "a refused join wrote {}", lan.state.display());
}
