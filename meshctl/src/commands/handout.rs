//! Handing out a device's config (`device add`, `device rotate`): the key pair is made here, the
//! change previewed, every output written, and only then the change committed.

use meshd_core::handout::{DeviceConfig, HubPeer};
use meshd_core::input::Label;
use meshd_core::keys::{PrivateKey, PublicKey};
use meshd_core::wire::admin::{DeviceHandout, Reply, Request};

use super::{Context, unexpected};
use crate::HandOut;
use crate::admin::Stale;
use crate::output::{self, Existing, Format, Output};
use crate::print::join;

/// How often a hand-out is previewed and written again when the network changed meanwhile.
const HAND_OUT_ATTEMPTS: usize = 3;

/// Make a key pair and hand out device `name`'s config as `out` asks, for the change `request` makes
/// with its public half. The change is previewed first; every output is written in full (files as
/// staged copies) before the change is committed, asking for exactly the previewed hand-out; then the
/// files are put in place. A failure before the commit changes nothing; a commit refused because the
/// network changed meanwhile is tried again (unless a stream already got the config).
pub fn hand_out(
    cx: &Context,
    out: HandOut,
    name: &Label,
    request: impl Fn(PublicKey, Option<Box<DeviceHandout>>) -> Request,
) -> anyhow::Result<()> {
    let dns = out.dns();
    // A reader that goes away (`| true`) must not end meshctl between staging files and cleaning them up:
    // here a closed output is an error like any other, and nothing is changed.
    let _sigpipe = SigpipeIgnored::new();
    let mut outputs = Vec::new();
    for (path, format) in [(&out.conf, Format::Conf), (&out.qr_png, Format::Png), (&out.qr_svg, Format::Svg)] {
        let Some(path) = path else { continue };
        let output = Output::open(path, format, Existing::Replace)?;
        if format == Format::Conf
            && output.is_file()
            && let Some(warning) = output::import_name_warning(path)
        {
            eprintln!("{warning}");
        }
        outputs.push(output);
    }
    if out.qr {
        outputs.push(Output::stdout(Format::TerminalQr));
    }
    // Without an output option the config is printed (with --json, only the device record is).
    if outputs.is_empty() && !cx.json {
        outputs.push(Output::stdout(Format::Conf));
    }
    // Another meshctl handing out a config waits: previews of both would offer the same address.
    let _lock = cx.admin.lock_hand_out();
    // The key pair is made here; only the public key goes to the controller.
    let key = PrivateKey::generate();
    let public_key = key.public_key();
    let mut attempt = 0;
    let handout = loop {
        attempt += 1;
        let preview = match cx.admin.send(Request::Preview { request: Box::new(request(public_key.clone(), None)) })? {
            Reply::DeviceHandout(h) => h,
            other => return unexpected(other),
        };
        let mut config = device_config(&key, &preview);
        dns.apply_to(&mut config);
        // Never hand out a config that would not read back as itself.
        config.validate().map_err(|e| anyhow::anyhow!("refusing to hand out the device config: {e}"))?;
        let text = config.to_wg_quick();
        let rendered = outputs.iter().map(|o| o.render(&text)).collect::<anyhow::Result<Vec<_>>>()?;
        for (output, bytes) in outputs.iter_mut().zip(&rendered) {
            output.stage(bytes)?;
        }
        let streamed: Vec<String> = outputs.iter().filter(|o| !o.is_file()).map(Output::shown).collect();
        for (output, bytes) in outputs.iter_mut().zip(&rendered).filter(|(o, _)| !o.is_file()) {
            output.write_stream(bytes)?;
        }
        match cx.admin.send(request(public_key.clone(), Some(preview))) {
            Ok(Reply::DeviceHandout(h)) => break h,
            Ok(other) => return unexpected(other),
            Err(e) if e.is::<Stale>() && streamed.is_empty() && attempt < HAND_OUT_ATTEMPTS => continue,
            Err(e) => {
                // Refused, or no clear answer (a daemon gone mid-call, a change saved but not applied):
                // if the device has the new key the change was made, and its config must not be lost.
                return match device_has_key(cx, name, &public_key) {
                    Some(true) => {
                        let placed: anyhow::Result<()> = outputs.iter_mut().try_for_each(Output::place);
                        placed?;
                        Err(e.context(format!("device {name} has its new key and its config was written, but")))
                    }
                    // Not made: the staged files go on drop.
                    Some(false) if streamed.is_empty() => Err(e),
                    Some(false) => Err(e.context(format!("the config written to {} is void", streamed.join(", ")))),
                    None => {
                        let kept: Vec<String> = outputs
                            .iter_mut()
                            .filter_map(Output::keep_staged)
                            .map(|p| p.display().to_string())
                            .collect();
                        match kept.is_empty() {
                            true => Err(e),
                            false => Err(e.context(format!("the config is kept in {}", kept.join(", ")))),
                        }
                    }
                };
            }
        }
    };
    for output in &mut outputs {
        output.place()?;
    }
    let d = &handout.device;
    if cx.json {
        println!("{}", serde_json::to_string_pretty(d)?);
    }
    eprintln!("device {}: {}, {}; may reach {}", d.name, d.address, d.address_v6, join(&d.allow));
    Ok(())
}

/// Whether device `name` is stored with `public_key`; `None` when that cannot be found out.
fn device_has_key(cx: &Context, name: &Label, public_key: &PublicKey) -> Option<bool> {
    match cx.admin.send(Request::DeviceList) {
        Ok(Reply::Devices(devices)) => {
            Some(devices.iter().any(|d| &d.name == name && d.public_key.as_ref() == Some(public_key)))
        }
        _ => None,
    }
}

/// SIGPIPE ignored while it lives (writes to a closed pipe then fail with EPIPE), its default action
/// back after.
struct SigpipeIgnored;

impl SigpipeIgnored {
    fn new() -> SigpipeIgnored {
        // SAFETY: signal(2) with SIG_IGN; meshctl is single-threaded here.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        SigpipeIgnored
    }
}

impl Drop for SigpipeIgnored {
    fn drop(&mut self) {
        meshd::exit_quietly_on_closed_output();
    }
}

/// The device's config: the controller's hand-out and the private key made here.
pub fn device_config(key: &PrivateKey, h: &DeviceHandout) -> DeviceConfig {
    DeviceConfig {
        private_key: key.clone(),
        addresses: h.addresses.clone(),
        dns_servers: h.dns_servers.clone(),
        dns_search: h.dns_search.clone(),
        mtu: Some(h.mtu),
        peer: HubPeer {
            public_key: h.hub_public_key.clone(),
            preshared_key: h.preshared_key.clone(),
            endpoint: h.endpoint.clone(),
            allowed_ips: h.allowed_ips.clone(),
            persistent_keepalive: h.persistent_keepalive,
        },
    }
}
