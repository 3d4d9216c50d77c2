//! Access rules between nodes: `from` may reach `to`; a node that is the target of any rule admits only
//! its sources.

use meshd_core::input::Label;
use meshd_core::model::AccessRule;
use meshd_core::wire::admin::Reply;

use super::ControlError;
use super::checks::member;
use super::store::Writer;

/// Let node `from` reach node `to` (allowing twice is harmless).
pub(super) fn allow(w: &Writer<'_>, from: Label, to: Label) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    member(&s, &from)?;
    member(&s, &to)?;
    if from == to {
        return Err(ControlError::RuleToSelf);
    }
    w.insert_rule(&AccessRule { from, to })?;
    Ok(Reply::Done)
}

/// Take the rule letting `from` reach `to` away.
pub(super) fn revoke(w: &Writer<'_>, from: Label, to: Label) -> Result<Reply, ControlError> {
    let rule = AccessRule { from, to };
    match w.delete_rule(&rule)? {
        true => Ok(Reply::Done),
        false => Err(ControlError::NoRule { from: rule.from, to: rule.to }),
    }
}
