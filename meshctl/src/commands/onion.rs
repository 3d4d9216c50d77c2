//! `meshctl expose --tor` and `unexpose --tor`: a service served as a Tor onion service by its node. The client
//! keys of client authorization are made here; only their public halves go to the controller. Each private
//! key is handed out once, in the line Orbot and tor import, as soon as the service's node has reported the
//! address; if it does not (offline, no tor there), the clients just added are taken off again.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use meshd_core::input::Label;
use meshd_core::model::{OnionClient, OnionView, ServiceView};
use meshd_core::tor::client::ClientKey;
use meshd_core::tor::onion::OnionAddress;
use meshd_core::wire::admin::{Reply, Request};

use super::{Context, unexpected};
use crate::output::{Existing, Format, Output};
use crate::print::clean;

/// How long to wait for the service's node to report the address (it makes the key when the change reaches
/// it: at once on the hub, within a second or two on a connected member).
const ADDRESS_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);

/// Where the client lines go besides standard output.
pub struct ClientOut {
    /// Also print each line as a QR code in the terminal.
    pub qr: bool,
    /// Write `DEVICE.auth_private` (the line) and `DEVICE.auth_private.png` (its QR code), 0600, here.
    pub out_dir: Option<PathBuf>,
}

/// The URL a phone app opens for an onion service: `http://ADDRESS/`, with the port unless it is 80.
pub fn onion_url(address: &OnionAddress, port: u16) -> String {
    match port {
        80 => format!("http://{address}/"),
        port => format!("http://{address}:{port}/"),
    }
}

/// Serve `service` over Tor at `port`, authorizing `clients` with new keys, handed out as `out` says.
pub fn expose_tor(
    cx: &Context,
    service: Label,
    port: Option<u16>,
    clients: Vec<Label>,
    out: ClientOut,
) -> anyhow::Result<()> {
    let before = find(cx, &service)?.tor.map(|t| Before { port: t.port, authorized_only: t.authorized_only });
    let keys: Vec<(Label, ClientKey)> = clients.iter().map(|d| (d.clone(), ClientKey::generate())).collect();
    // The files are checked before anything changes.
    let mut files = match &out.out_dir {
        Some(dir) => (keys.iter())
            .map(|(device, _)| ClientFiles::open(&dir.join(format!("{device}.auth_private"))))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    // Client lines need the address, which only a running node reports.
    if !keys.is_empty() && cx.admin.answered_offline() {
        bail!(
            "no meshd is running on this state directory: start `meshd run` first, so the node can report the onion address the client lines need"
        );
    }
    let public = keys.iter().map(|(device, key)| OnionClient { device: device.clone(), public_key: key.public_key() });
    let request = Request::ExposeTor { service: service.clone(), port, clients: public.collect() };
    let view = match cx.admin.send(request)? {
        Reply::Service(view) => view,
        other => return unexpected(other),
    };
    // Without a daemon nobody can report an address now: the exposure waits for `meshd run`.
    if keys.is_empty() && cx.admin.answered_offline() {
        return report(cx, &view);
    }
    // From here the change is stored: unless the node can serve it (and the clients' lines reach the operator),
    // it is taken back.
    let handed = match address_of(cx, view) {
        Ok((view, Some(address))) => hand_out(&keys, &address, &mut files, out.qr, cx.json).map(|()| view),
        // An onion service without clients may wait for its node to come online.
        Ok((view, None)) if keys.is_empty() => Ok(view),
        Ok((view, None)) => Err(anyhow!(
            "node {} did not report the onion address of {} within {} s, so the client lines cannot be made (is it \
             online? meshctl node list shows when it was last heard)",
            view.node,
            view.name,
            ADDRESS_WAIT.as_secs()
        )),
        Err(e) => Err(e),
    };
    match handed {
        Ok(view) => report(cx, &view),
        Err(e) => match take_back(cx, &service, before, &clients) {
            Ok(()) => Err(e.context("nothing was changed")),
            Err(undo) => Err(e.context(format!("and taking the new clients off failed too ({undo:#})"))),
        },
    }
}

/// What a service's onion service was before clients were added: its port and whether it was for clients only.
#[derive(Debug, Clone, Copy)]
pub(super) struct Before {
    pub port: u16,
    pub authorized_only: bool,
}

/// Take back an exposure that added `clients` (this command's only): they are taken off first, which can only
/// close; then, unless someone else's clients are there now (another meshctl meanwhile), the onion service is
/// put back as it was `before`: none, open to all, or at its earlier port. Never opened while others' clients
/// are listed.
pub(super) fn take_back(
    cx: &Context,
    service: &Label,
    before: Option<Before>,
    clients: &[Label],
) -> anyhow::Result<()> {
    if !clients.is_empty() {
        cx.admin.send(Request::UnexposeTor { service: service.clone(), clients: clients.to_vec() })?;
    }
    let Some(now) = find(cx, service)?.tor else { return Ok(()) };
    let unexpose = Request::UnexposeTor { service: service.clone(), clients: Vec::new() };
    let expose = |port| Request::ExposeTor { service: service.clone(), port: Some(port), clients: Vec::new() };
    let restore = match before {
        None if now.clients.is_empty() => Some(unexpose),
        Some(Before { port, authorized_only: false }) if now.clients.is_empty() => {
            Some(Request::Batch { requests: vec![unexpose, expose(port)] })
        }
        Some(Before { port, .. }) if now.port != port => Some(expose(port)),
        _ => None,
    };
    if let Some(request) = restore {
        cx.admin.send(request)?;
    }
    Ok(())
}

/// A client's files: the line at `PATH` (an `.auth_private` file tor's `ClientOnionAuthDir` reads) and its QR code
/// at `PATH.png`. Opened before anything changes (an existing file is refused), staged, then put in place.
pub(super) struct ClientFiles {
    line: Output,
    qr: Output,
}

impl ClientFiles {
    pub(super) fn open(path: &std::path::Path) -> anyhow::Result<ClientFiles> {
        let mut png = path.as_os_str().to_owned();
        png.push(".png");
        Ok(ClientFiles {
            line: Output::open(path, Format::Conf, Existing::Refuse)?,
            qr: Output::open(std::path::Path::new(&png), Format::Png, Existing::Refuse)?,
        })
    }

    /// Write `line` (and its QR code) to temporary files beside their places.
    pub(super) fn stage(&mut self, line: &str) -> anyhow::Result<()> {
        let text = format!("{line}\n");
        let (bytes, png) = (self.line.render(&text)?, self.qr.render(&text)?);
        self.line.stage(&bytes)?;
        self.qr.stage(&png)
    }

    /// Put both in place.
    pub(super) fn place(&mut self) -> anyhow::Result<()> {
        self.line.place()?;
        self.qr.place()
    }

    /// Where the line is.
    pub(super) fn path(&self) -> &std::path::Path {
        self.line.path()
    }
}

/// Stop serving `service` over Tor, or take `clients` off its clients.
pub fn unexpose_tor(cx: &Context, service: Label, clients: Vec<Label>) -> anyhow::Result<()> {
    let whole = clients.is_empty();
    let view = match cx.admin.send(Request::UnexposeTor { service, clients: clients.clone() })? {
        Reply::Service(view) => view,
        other => return unexpected(other),
    };
    cx.print(&view, || match whole {
        true => println!("service {} no longer served over Tor (its key is kept on its node)", view.name),
        false => {
            let names: Vec<&str> = clients.iter().map(Label::as_str).collect();
            println!(
                "{} taken off the clients of {}'s onion service; its node publishes a new descriptor",
                names.join(", "),
                view.name
            );
        }
    })
}

/// The service named `name`.
pub(super) fn find(cx: &Context, name: &Label) -> anyhow::Result<ServiceView> {
    match cx.admin.send(Request::ServiceList)? {
        Reply::Services(services) => {
            services.into_iter().find(|s| s.name == *name).ok_or_else(|| anyhow!("no service named \"{name}\""))
        }
        other => unexpected(other),
    }
}

/// The service's view once its node has reported the onion address, or without one if the node said nothing
/// within [`ADDRESS_WAIT`] (offline). Errors: the node reported why it cannot serve it.
pub(super) fn address_of(cx: &Context, mut view: ServiceView) -> anyhow::Result<(ServiceView, Option<OnionAddress>)> {
    let deadline = Instant::now() + ADDRESS_WAIT;
    loop {
        match &view.tor {
            Some(OnionView { address: Some(address), .. }) => {
                let address = address.clone();
                return Ok((view, Some(address)));
            }
            Some(OnionView { error: Some(error), .. }) => {
                bail!("node {} cannot serve {} over Tor: {}", view.node, view.name, clean(error))
            }
            Some(_) if Instant::now() < deadline => std::thread::sleep(POLL),
            Some(_) => return Ok((view, None)),
            None => bail!("service {} is not served over Tor", view.name),
        }
        view = find(cx, &view.name)?;
    }
}

/// Write every client's line to its `files` (none without `--out-dir`), then print them.
fn hand_out(
    keys: &[(Label, ClientKey)],
    address: &OnionAddress,
    files: &mut [ClientFiles],
    qr: bool,
    json: bool,
) -> anyhow::Result<()> {
    let lines: Vec<(&Label, String)> = keys.iter().map(|(d, k)| (d, k.auth_private_line(address))).collect();
    if !files.is_empty() {
        for ((_, line), files) in lines.iter().zip(files.iter_mut()) {
            files.stage(line)?;
        }
        for files in files.iter_mut() {
            files.place()?;
        }
    }
    for (device, line) in &lines {
        eprintln!("client key of {device} (import it in Orbot or a tor ClientOnionAuthDir; it is shown only now):");
        // With --json standard output is the service record alone, so the lines go with the notes.
        match json {
            true => eprintln!("{line}"),
            false => println!("{line}"),
        }
        if qr {
            let code = meshd_core::handout::qr_terminal(line)?;
            match json {
                true => eprint!("{code}"),
                false => print!("{code}"),
            }
        }
    }
    Ok(())
}

/// The service's onion address (or why there is none) in one line.
fn report(cx: &Context, view: &ServiceView) -> anyhow::Result<()> {
    let Some(tor) = &view.tor else { bail!("service {} is not served over Tor", view.name) };
    cx.print(view, || {
        let clients = match (tor.authorized_only, tor.clients.is_empty()) {
            (false, _) => "anyone with the address".to_owned(),
            (true, true) => "no client left: not served".to_owned(),
            (true, false) => {
                format!("clients {}", tor.clients.iter().map(Label::as_str).collect::<Vec<_>>().join(", "))
            }
        };
        match (&tor.address, &tor.error) {
            (Some(address), _) => println!("service {} on {} ({clients})", view.name, onion_url(address, tor.port)),
            (None, Some(error)) => {
                println!("service {} over Tor: node {} cannot serve it: {}", view.name, view.node, clean(error))
            }
            (None, None) => println!(
                "service {} over Tor, port {} ({clients}); node {} has not reported its address yet",
                view.name, tor.port, view.node
            ),
        }
    })
}
