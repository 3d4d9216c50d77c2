//! `meshctl access`: which nodes may reach which.

use meshd_core::input::Label;
use meshd_core::model::AccessRule;
use meshd_core::wire::admin::{Reply, Request};

use super::{Context, done, unexpected};
use crate::print::print_rules;

pub fn allow(cx: &Context, from: Label, to: Label) -> anyhow::Result<()> {
    done(cx, Request::AccessAllow { from: from.clone(), to: to.clone() })?;
    let rule = AccessRule { from, to };
    cx.print(&serde_json::json!({ "allowed": rule }), || {
        println!("{} may reach {}; {} admits only the nodes its rules name", rule.from, rule.to, rule.to)
    })
}

pub fn revoke(cx: &Context, from: Label, to: Label) -> anyhow::Result<()> {
    done(cx, Request::AccessRevoke { from: from.clone(), to: to.clone() })?;
    let rule = AccessRule { from, to };
    cx.print(&serde_json::json!({ "revoked": rule }), || println!("revoked {} -> {}", rule.from, rule.to))
}

pub fn list(cx: &Context) -> anyhow::Result<()> {
    match cx.admin.send(Request::AccessList)? {
        Reply::Rules(rules) => cx.print(&rules, || print_rules(&rules)),
        other => unexpected(other),
    }
}

#[cfg(test)]
mod tests {
    use meshd::controller::fixtures::label;

    use super::*;
    use crate::testing::{meshctl, network, snapshot};

    #[test]
    fn access_rules_between_members() {
        let dir = network(&["consensus", "validator"]);
        meshctl(&dir, &["access", "allow", "consensus", "validator"]).unwrap();
        meshctl(&dir, &["access", "allow", "hub", "validator", "--json"]).unwrap();
        let rule = |from: &str, to: &str| AccessRule { from: label(from), to: label(to) };
        assert_eq!(snapshot(&dir).rules, [rule("consensus", "validator"), rule("hub", "validator")]);
        meshctl(&dir, &["access", "list"]).unwrap();
        meshctl(&dir, &["access", "revoke", "hub", "validator"]).unwrap();
        assert_eq!(snapshot(&dir).rules, [rule("consensus", "validator")]);
        let refused = meshctl(&dir, &["access", "revoke", "hub", "validator"]).unwrap_err();
        assert_eq!(refused.to_string(), "no rule lets \"hub\" reach \"validator\"");
    }
}
