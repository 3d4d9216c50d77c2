//! `meshctl device`: roaming devices with the stock WireGuard app. Adding one and giving one new keys
//! hand out its config ([`super::handout`]).

use anyhow::Context as _;
use meshd_core::input::Label;
use meshd_core::wire::admin::{Reply, Request};

use super::handout::hand_out;
use super::{Context, done, removed, unexpected};
use crate::HandOut;
use crate::print::{join, print_devices};

pub fn list(cx: &Context) -> anyhow::Result<()> {
    match cx.admin.send(Request::DeviceList)? {
        Reply::Devices(devices) => cx.print(&devices, || print_devices(&devices, cx.admin.answered_offline())),
        other => unexpected(other),
    }
}

pub fn add(cx: &Context, name: Label, allow: Vec<Label>, out: HandOut) -> anyhow::Result<()> {
    hand_out(cx, out, &name, |public_key, expect| Request::DeviceAdd {
        name: name.clone(),
        allow: allow.clone(),
        public_key,
        expect,
    })
}

pub fn rotate(cx: &Context, name: Label, out: HandOut) -> anyhow::Result<()> {
    hand_out(cx, out, &name, |public_key, expect| Request::DeviceRotate { name: name.clone(), public_key, expect })
}

pub fn remove(cx: &Context, name: Label) -> anyhow::Result<()> {
    removed(cx, Request::DeviceRemove { name: name.clone() }, "device", &name)
}

/// Replace the services device `name` may reach.
pub fn update(cx: &Context, name: Label, allow: Vec<Label>) -> anyhow::Result<()> {
    done(cx, Request::DeviceAllow { name: name.clone(), allow })?;
    let devices = match cx.admin.send(Request::DeviceList)? {
        Reply::Devices(devices) => devices,
        other => return unexpected(other),
    };
    let device = devices.into_iter().find(|d| d.name == name).with_context(|| format!("device {name} is gone"))?;
    cx.print(&device, || println!("device {}: may reach {}", device.name, join(&device.allow)))
}
