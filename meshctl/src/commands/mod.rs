//! meshctl's commands, one file per command group; each sends its requests through [`Admin`] and
//! prints the replies with [`crate::print`].

pub mod access;
pub mod apply;
pub mod devices;
pub mod handout;
pub mod nodes;
pub mod onion;
pub mod services;
pub mod status;

use anyhow::bail;
use meshd_core::input::Label;
use meshd_core::wire::admin::{Reply, Request};
use serde::Serialize;

use crate::admin::Admin;

/// What every command works with: the controller, and whether to print JSON (`--json`).
pub struct Context {
    pub admin: Admin,
    pub json: bool,
}

impl Context {
    /// Print `value` as JSON with `--json`, else what `human` prints.
    pub fn print<T: Serialize>(&self, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
        crate::print::print(self.json, value, human)
    }
}

/// Send a removal and say what was removed (`KIND NAME removed`).
fn removed(cx: &Context, request: Request, kind: &str, name: &Label) -> anyhow::Result<()> {
    match cx.admin.send(request)? {
        Reply::Removed => {
            if cx.json {
                println!("{}", serde_json::json!({ "removed": name }));
            } else {
                println!("{kind} {name} removed");
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

/// Send a request whose reply is only that it was done.
fn done(cx: &Context, request: Request) -> anyhow::Result<()> {
    match cx.admin.send(request)? {
        Reply::Done => Ok(()),
        other => unexpected(other),
    }
}

/// A reply that does not belong to the request.
pub fn unexpected<T>(reply: Reply) -> anyhow::Result<T> {
    bail!("the controller sent an unexpected reply: {reply:?}")
}
