//! A declaration (`meshd_core::declare`) carried out through the real controller, request by request as
//! `meshctl apply` does: the network converges and a second plan is empty.

use meshd_core::declare::{Current, Declaration, Plan, plan};
use meshd_core::fixtures::{SAMPLE_DECLARATION as EXAMPLE, label};
use meshd_core::input::Label;
use meshd_core::keys::PrivateKey;
use meshd_core::model::{AccessRule, Protocol, Role};
use meshd_core::tor::client::ClientKey;
use meshd_core::wire::admin::{Reply, Request};

use super::Controller;
use super::fixtures;

fn labels(names: &[&str]) -> Vec<Label> {
    names.iter().map(|n| label(n)).collect()
}

fn rule(from: &str, to: &str) -> AccessRule {
    AccessRule { from: label(from), to: label(to) }
}

fn parse(text: &str) -> Declaration {
    Declaration::parse(text, &label("hub")).unwrap()
}

/// A controller over a new network (hub `hub`) in `dir`, with `members` joined through real invites.
fn controller(dir: &std::path::Path, members: &[(&str, Role)]) -> Controller {
    let mut c = fixtures::new_network(dir, "10.77.0.0/16");
    for &(name, role) in members {
        let token = fixtures::invite_as(&mut c, name, role, 60);
        c.redeem(&fixtures::join_request(&token)).unwrap();
    }
    c
}

fn read(c: &mut Controller) -> Current {
    let Reply::Status(status) = c.handle(Request::Status).unwrap() else { panic!() };
    let Reply::Invites(invites) = c.handle(Request::NodeInvites).unwrap() else { panic!() };
    let Reply::Rules(rules) = c.handle(Request::AccessList).unwrap() else { panic!() };
    Current::from_views(&status, &invites, &rules).unwrap()
}

fn apply(c: &mut Controller, text: &str) -> Plan {
    let current = read(c);
    let plan = plan(&Declaration::parse(text, &current.hub).unwrap(), &current).unwrap();
    for step in &plan.steps {
        for request in
            step.requests(60, || PrivateKey::generate().public_key(), |_, _| ClientKey::generate().public_key())
        {
            c.handle(request).unwrap_or_else(|e| panic!("{step}: {e}"));
        }
    }
    plan
}

#[test]
fn applying_through_the_controller_converges_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path(), &[("consensus", Role::Node), ("validator", Role::Relay), ("old", Role::Node)]);
    c.handle(Request::AccessAllow { from: label("old"), to: label("consensus") }).unwrap();
    let first = apply(&mut c, EXAMPLE);
    assert!(first.steps.len() >= 8, "{:#?}", first.steps);
    assert!(first.waiting.is_empty(), "{:?}", first.waiting);
    let again = plan(&parse(EXAMPLE), &read(&mut c)).unwrap();
    assert_eq!(again, Plan::default(), "the network matches after one apply");

    let s = c.snapshot().unwrap();
    assert_eq!(
        s.nodes.iter().map(|n| (n.name.as_str(), n.disabled)).collect::<Vec<_>>(),
        [("hub", false), ("consensus", false), ("validator", true)],
        "old removed, validator disabled"
    );
    let Reply::Invites(invites) = c.handle(Request::NodeInvites).unwrap() else { panic!() };
    assert_eq!(invites.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["vps1"]);
    assert_eq!(s.rules, [rule("consensus", "validator"), rule("hub", "validator")]);
    let beacon = s.services.iter().find(|v| v.name.as_str() == "beacon").unwrap();
    assert_eq!((beacon.node.as_str(), beacon.port), ("consensus", 80));
    assert_eq!(s.devices[0].allow, labels(&["beacon", "wallet"]));

    // Move beacon to the hub and change wallet: the phone keeps both grants.
    let moved = EXAMPLE.replace("node = \"consensus\"", "node = \"hub\"").replace("9737\"", "9738\"");
    let second = apply(&mut c, &moved);
    assert_eq!(second.steps.len(), 3, "{:#?}", second.steps);
    assert_eq!(plan(&parse(&moved), &read(&mut c)).unwrap(), Plan::default());
    let s = c.snapshot().unwrap();
    assert_eq!(s.devices[0].allow, labels(&["beacon", "wallet"]), "grants restored after the move");

    // A UDP service converges too: the controller reports its protocol, so a second plan is empty.
    let with_udp =
        format!("{moved}[[service]]\nname = \"echo\"\nnode = \"hub\"\ntarget = \"127.0.0.1:7\"\nprotocol = \"udp\"\n");
    assert_eq!(apply(&mut c, &with_udp).steps.len(), 1);
    assert_eq!(plan(&parse(&with_udp), &read(&mut c)).unwrap(), Plan::default());
    let s = c.snapshot().unwrap();
    assert_eq!(s.services.iter().find(|v| v.name.as_str() == "echo").map(|v| v.protocol), Some(Protocol::Udp));

    // An empty file takes every member, service, device and rule away; the hub stays.
    apply(&mut c, "");
    let s = c.snapshot().unwrap();
    assert_eq!(s.nodes.len(), 1);
    assert!(s.services.is_empty() && s.devices.is_empty() && s.rules.is_empty());
    let Reply::Invites(invites) = c.handle(Request::NodeInvites).unwrap() else { panic!() };
    assert!(invites.is_empty());
    assert_eq!(plan(&Declaration::default(), &read(&mut c)).unwrap(), Plan::default());
}
