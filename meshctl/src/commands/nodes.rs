//! `meshctl node`: hosts running meshd, and the invites that let a host join.

use std::time::Duration;

use anyhow::Context as _;
use meshd_core::input::Label;
use meshd_core::model::Role;
use meshd_core::wire::admin::{EndpointChange, Reply, Request};

use super::{Context, done, removed, unexpected};
use crate::print::{print_invites, print_nodes};

pub fn list(cx: &Context) -> anyhow::Result<()> {
    match cx.admin.send(Request::NodeList)? {
        Reply::Nodes(nodes) => cx.print(&nodes, || print_nodes(&nodes, cx.admin.answered_offline())),
        other => unexpected(other),
    }
}

/// Print a one-time token for `meshd join` (the hint how to use it goes to standard error).
pub fn invite(cx: &Context, name: Label, role: Role, expires: Duration) -> anyhow::Result<()> {
    match cx.admin.send(Request::NodeInvite { name, role, expires_secs: expires.as_secs() })? {
        Reply::Invite(issued) => {
            let i = &issued.invite;
            eprintln!(
                "invite for {} expires in {} s; on that host run: meshd join - (token on stdin)",
                i.name,
                expires.as_secs()
            );
            cx.print(&issued, || println!("{}", issued.token))
        }
        other => unexpected(other),
    }
}

pub fn invites(cx: &Context) -> anyhow::Result<()> {
    match cx.admin.send(Request::NodeInvites)? {
        Reply::Invites(invites) => cx.print(&invites, || print_invites(&invites)),
        other => unexpected(other),
    }
}

pub fn uninvite(cx: &Context, name: Label) -> anyhow::Result<()> {
    removed(cx, Request::NodeUninvite { name: name.clone() }, "invite for", &name)
}

pub fn remove(cx: &Context, name: Label) -> anyhow::Result<()> {
    removed(cx, Request::NodeRemove { name: name.clone() }, "node", &name)
}

pub fn disable(cx: &Context, name: Label) -> anyhow::Result<()> {
    done(cx, Request::NodeDisable { name: name.clone() })?;
    changed(cx, &name, &format!("node {name} disabled: no host keeps it as a peer until it is enabled"))
}

pub fn enable(cx: &Context, name: Label) -> anyhow::Result<()> {
    done(cx, Request::NodeEnable { name: name.clone() })?;
    changed(cx, &name, &format!("node {name} enabled: it is in the mesh again"))
}

pub fn rotate(cx: &Context, name: Label) -> anyhow::Result<()> {
    done(cx, Request::NodeRotate { name: name.clone() })?;
    changed(cx, &name, &format!("node {name} will make a new key on its next contact with the controller"))
}

/// Change where node `name` is reached or its MTU; when the hub's endpoint changes, name the devices whose config
/// still names the old one (on standard error too, so a script reading `--json` sees it).
pub fn update(cx: &Context, name: Label, endpoint: Option<EndpointChange>, mtu: Option<u16>) -> anyhow::Result<()> {
    match cx.admin.send(Request::NodeUpdate { name, endpoint, mtu })? {
        Reply::NodeUpdated(updated) => {
            let stale = &updated.devices_with_old_endpoint;
            if !stale.is_empty() {
                let names = stale.iter().map(Label::as_str).collect::<Vec<_>>().join(", ");
                eprintln!(
                    "warning: the config of these devices names the hub's old endpoint: {names}; give each a new \
                     config (meshctl device rotate NAME --qr) or edit the Endpoint in its WireGuard app"
                );
            }
            let node = &updated.node;
            let endpoint = node.endpoint.as_deref().unwrap_or("none (behind NAT)");
            cx.print(&updated, || println!("node {}: endpoint {endpoint}, mtu {}", node.name, node.mtu))
        }
        other => unexpected(other),
    }
}

/// After a change to node `name`: its view with `--json`, else `line`.
fn changed(cx: &Context, name: &Label, line: &str) -> anyhow::Result<()> {
    let nodes = match cx.admin.send(Request::NodeList)? {
        Reply::Nodes(nodes) => nodes,
        other => return unexpected(other),
    };
    let node = nodes.into_iter().find(|n| &n.name == name).with_context(|| format!("node {name} is gone"))?;
    cx.print(&node, || println!("{line}"))
}

#[cfg(test)]
mod tests {
    use meshd_core::model::NodeView;

    use crate::print::nodes_table;
    use crate::testing::{TempDir, meshctl, network, snapshot};

    fn views(dir: &TempDir) -> Vec<NodeView> {
        let s = snapshot(dir);
        s.nodes.iter().map(|n| s.node_view(n)).collect()
    }

    /// The STATE column of `name` in the node table (between the STATE and LAST HEARD headings).
    fn state_column(dir: &TempDir, name: &str) -> String {
        let table = nodes_table(&views(dir), false);
        let header = table.lines().next().unwrap();
        let (from, to) = (header.find("STATE").unwrap(), header.find("LAST HEARD").unwrap());
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap();
        line[from..to].trim().to_owned()
    }

    #[test]
    fn disable_enable_and_rotate_a_member_show_in_the_node_table() {
        let dir = network(&["vps"]);
        assert_eq!(state_column(&dir, "vps"), "active");
        meshctl(&dir, &["node", "disable", "vps"]).unwrap();
        assert!(snapshot(&dir).nodes[1].disabled);
        assert_eq!(state_column(&dir, "vps"), "disabled");
        let refused = meshctl(&dir, &["node", "rotate", "vps"]).unwrap_err();
        assert_eq!(refused.to_string(), "\"vps\" is disabled; enable it first");
        meshctl(&dir, &["node", "enable", "vps"]).unwrap();
        assert_eq!(state_column(&dir, "vps"), "active");
        meshctl(&dir, &["node", "rotate", "vps", "--json"]).unwrap();
        assert!(snapshot(&dir).nodes[1].rotate_key);
        assert_eq!(state_column(&dir, "vps"), "key rotation pending");
        meshctl(&dir, &["node", "disable", "vps"]).unwrap();
        assert_eq!(state_column(&dir, "vps"), "disabled, key rotation pending");
        assert_eq!(state_column(&dir, "hub"), "active");
    }
}
