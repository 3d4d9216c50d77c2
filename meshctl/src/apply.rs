//! `meshctl apply`: make the network match a declaration file. The plan comes from meshd's pure
//! [`declare`] core; this edge reads the network through the admin API, prints the plan, sends the
//! plan's requests as one batch (all or nothing) and hands out the new devices' configs and invite tokens.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use meshd_core::declare::{self, Current, Declaration, Plan, Step};
use meshd_core::handout::{self, DeviceDns};
use meshd_core::input::Label;
use meshd_core::keys::PrivateKey;
use meshd_core::wire::admin::{Reply, Request};
use serde::Serialize;

use crate::output::{Existing, Format, Output};
use crate::{BatchRefused, Global, device_config, send};

/// What `meshctl apply` was asked to do.
pub struct Apply {
    pub file: PathBuf,
    pub dry_run: bool,
    pub out_dir: PathBuf,
    pub expires: Duration,
}

/// What was done, printed at the end (as JSON with `--json`).
#[derive(Serialize)]
struct Report<'a> {
    changes: &'a [Step],
    waiting: &'a [declare::Waiting],
    dry_run: bool,
    /// How many changes were carried out.
    applied: usize,
    invites: Vec<NewInvite>,
    configs: Vec<NewConfig>,
}

#[derive(Serialize)]
struct NewInvite {
    name: Label,
    token: String,
}

#[derive(Serialize)]
struct NewConfig {
    device: Label,
    address: String,
    address_v6: String,
    path: PathBuf,
}

/// Read the file and the network, print the plan, and carry it out unless this is a dry run.
pub fn apply(g: &Global, args: Apply) -> anyhow::Result<()> {
    let file = args.file.display();
    let text = fs::read_to_string(&args.file).with_context(|| format!("cannot read {file}"))?;
    let current = read_network(g)?;
    let declaration = Declaration::parse(&text, &current.hub).map_err(|e| anyhow!("{file}: {e}"))?;
    let plan = declare::plan(&declaration, &current).map_err(|e| anyhow!("{file}: {e}"))?;
    // Every config file is checked before the first change, and written before the batch is committed.
    let mut configs = Vec::new();
    let mut paths: BTreeMap<PathBuf, &Label> = BTreeMap::new();
    for step in &plan.steps {
        if let Step::AddDevice { name, .. } = step {
            let path = config_path(&args.out_dir, name)?;
            if let Some(other) = paths.insert(path.clone(), name) {
                bail!("devices {other} and {name} would both have their config in {}: rename one", path.display());
            }
            let output = Output::open(&path, Format::Conf, Existing::Refuse)?;
            let dns = declaration.device_dns.get(name).cloned().unwrap_or_default();
            configs.push(ConfigFile { name: name.clone(), output, dns });
        }
    }

    let mut report = Report {
        changes: &plan.steps,
        waiting: &plan.waiting,
        dry_run: args.dry_run,
        applied: 0,
        invites: Vec::new(),
        configs: Vec::new(),
    };
    if !g.json {
        print_plan(&plan);
    }
    let outcome = if args.dry_run || plan.steps.is_empty() {
        Ok(())
    } else {
        execute(g, &plan, args.expires.as_secs(), configs, &mut report)
    };
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !plan.steps.is_empty() {
        match args.dry_run {
            true => println!("dry run: {} changes, none applied", plan.steps.len()),
            false => println!("applied {} of {} changes", report.applied, plan.steps.len()),
        }
        for c in &report.configs {
            println!("device {}: {}, {}; config in {}", c.device, c.address, c.address_v6, c.path.display());
        }
        // Tokens last, one `NAME TOKEN` line each, for scripts.
        for invite in &report.invites {
            println!("{} {}", invite.name, invite.token);
        }
    }
    outcome
}

/// The network through the admin API: the same view for a running daemon and for offline work.
fn read_network(g: &Global) -> anyhow::Result<Current> {
    let status = match send(g, Request::Status)? {
        Reply::Status(status) => status,
        other => bail!("the controller sent an unexpected reply: {other:?}"),
    };
    let invites = match send(g, Request::NodeInvites)? {
        Reply::Invites(invites) => invites,
        other => bail!("the controller sent an unexpected reply: {other:?}"),
    };
    let rules = match send(g, Request::AccessList)? {
        Reply::Rules(rules) => rules,
        other => bail!("the controller sent an unexpected reply: {other:?}"),
    };
    Ok(Current::from_views(&status, &invites, &rules)?)
}

fn print_plan(plan: &Plan) {
    for step in &plan.steps {
        println!("{step}");
    }
    for waiting in &plan.waiting {
        println!("{waiting}");
    }
    if plan.steps.is_empty() {
        println!("no changes");
    }
}

/// A new device's config file, resolved before anything changes.
struct ConfigFile {
    name: Label,
    output: Output,
    dns: DeviceDns,
}

/// Carry the plan out as one batch: the controller makes every change or, refusing one, none. The batch
/// is previewed first, and the new devices' configs are written (staged) from the preview before the
/// batch is committed asking for exactly those hand-outs; then they are put in place and the invite
/// tokens handed out.
fn execute(
    g: &Global,
    plan: &Plan,
    invite_secs: u64,
    mut configs: Vec<ConfigFile>,
    report: &mut Report<'_>,
) -> anyhow::Result<()> {
    let mut device_keys = Vec::new();
    let mut requests = Vec::new();
    // The step each request belongs to, to name the change the controller refused.
    let mut step_of = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let made = step.requests(invite_secs, || {
            let key = PrivateKey::generate();
            let public = key.public_key();
            device_keys.push(key);
            public
        });
        step_of.extend(std::iter::repeat_n(i, made.len()));
        requests.extend(made);
    }
    let total = plan.steps.len();
    // As for `device add`: no other hand-out between the preview and the commit.
    let _lock = crate::StateDir::new(&g.state_dir).lock_hand_out().ok();
    // Only a refusal says for sure that nothing happened (not, say, a daemon gone mid-call).
    let refused = |e: anyhow::Error| match e.downcast_ref::<BatchRefused>().and_then(|r| step_of.get(r.index)) {
        Some(&i) => anyhow!("change {} of {total} ({}) failed: {e}; nothing was applied", i + 1, plan.steps[i]),
        None => e,
    };
    let previewed = match send(g, Request::Preview { request: Box::new(Request::Batch { requests: requests.clone() }) })
    {
        Ok(Reply::Batch(replies)) => replies,
        Ok(other) => bail!("the controller sent an unexpected reply: {other:?}"),
        Err(e) => return Err(refused(e)),
    };
    if device_keys.len() != configs.len() {
        bail!("{} device keys for {} config files", device_keys.len(), configs.len());
    }
    let mut handouts = device_keys.iter().zip(configs.iter_mut());
    for (request, reply) in requests.iter_mut().zip(previewed) {
        let (Request::DeviceAdd { expect, .. }, Reply::DeviceHandout(handout)) = (request, reply) else { continue };
        let (key, config) = handouts.next().context("a device was added that the plan did not make a key for")?;
        let mut device = device_config(key, &handout);
        config.dns.apply_to(&mut device);
        // Never hand out a config that would not read back as itself.
        device.validate().map_err(|e| anyhow!("refusing to hand out the config of device {}: {e}", config.name))?;
        let bytes = config.output.render(&device.to_wg_quick())?;
        config.output.stage(&bytes)?;
        *expect = Some(handout);
    }

    let replies = match send(g, Request::Batch { requests }) {
        Ok(Reply::Batch(replies)) => replies,
        Ok(other) => bail!("the controller sent an unexpected reply: {other:?}"),
        Err(e) if e.is::<BatchRefused>() => return Err(refused(e)),
        Err(e) => return Err(unclear_outcome(g, e, &device_keys, &mut configs)),
    };
    report.applied = total;

    let mut placed = configs.iter_mut();
    let mut unplaced = Vec::new();
    for reply in replies {
        match reply {
            Reply::Invite(issued) => report.invites.push(NewInvite { name: issued.invite.name, token: issued.token }),
            Reply::DeviceHandout(handout) => {
                let Some(config) = placed.next() else { continue };
                match config.output.place() {
                    Ok(()) => report.configs.push(NewConfig {
                        device: handout.device.name.clone(),
                        address: handout.device.address.to_string(),
                        address_v6: handout.device.address_v6.to_string(),
                        path: config.output.path().to_owned(),
                    }),
                    Err(e) => unplaced.push(format!("device {}: {e:#}", handout.device.name)),
                }
            }
            _ => {}
        }
    }
    match unplaced.is_empty() {
        true => Ok(()),
        false => bail!("applied, but some device configs could not be put in place: {}", unplaced.join("; ")),
    }
}

/// The batch got no clear answer (a daemon gone mid-call, a change saved but not applied to the
/// interface): the new devices' configs are put in place if the devices exist with their new keys,
/// kept where they were staged if that cannot be told, and dropped if the batch was not carried out.
fn unclear_outcome(g: &Global, e: anyhow::Error, keys: &[PrivateKey], configs: &mut [ConfigFile]) -> anyhow::Error {
    let devices = match send(g, Request::DeviceList) {
        Ok(Reply::Devices(devices)) => Some(devices),
        _ => None,
    };
    let made = |key: &PrivateKey, config: &ConfigFile| {
        devices.as_ref().map(|list| list.iter().any(|d| d.name == config.name && d.public_key == key.public_key()))
    };
    let mut notes = Vec::new();
    for (key, config) in keys.iter().zip(configs.iter_mut()) {
        match made(key, config) {
            Some(true) => match config.output.place() {
                Ok(()) => notes.push(format!(
                    "device {} was added, its config is in {}",
                    config.name,
                    config.output.path().display()
                )),
                Err(placing) => notes.push(format!("device {} was added: {placing:#}", config.name)),
            },
            Some(false) => {}
            None => {
                if let Some(kept) = config.output.keep_staged() {
                    notes.push(format!("the config of device {} is kept in {}", config.name, kept.display()));
                }
            }
        }
    }
    match notes.is_empty() {
        true => e,
        false => e.context(notes.join("; ")),
    }
}

/// Where a new device's config goes: `DIR/NAME.conf`, NAME shortened to a tunnel name the WireGuard
/// apps import (see [`handout::tunnel_name`]).
fn config_path(dir: &Path, name: &Label) -> anyhow::Result<PathBuf> {
    if !fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
        bail!("--out-dir {} is not a directory", dir.display());
    }
    Ok(dir.join(format!("{}.conf", handout::tunnel_name(name.as_str()))))
}
