//! `meshctl apply`: make the network match a declaration file. The plan comes from meshd's pure
//! [`declare`] core; this edge reads the network through the admin API, prints the plan, sends the
//! plan's requests as one batch (all or nothing) and hands out the new devices' configs and invite tokens.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use meshd::api::{Reply, Request};
use meshd::declare::{self, Current, Declaration, Plan, Step};
use meshd::input::Label;
use meshd::keys::PrivateKey;
use serde::Serialize;

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
    // Every config file is checked (and, for a real run, created) before the first change.
    let mut configs = Vec::new();
    for step in &plan.steps {
        if let Step::AddDevice { name, .. } = step {
            let path = config_path(&args.out_dir, name)?;
            if !args.dry_run {
                configs.push(ConfigFile::create(name.clone(), path)?);
            }
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

/// Carry the plan out as one batch: the controller makes every change or, refusing one, none. Then hand
/// out what was made: the new devices' configs and the invite tokens.
fn execute(
    g: &Global,
    plan: &Plan,
    invite_secs: u64,
    configs: Vec<ConfigFile>,
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
    let replies = match send(g, Request::Batch { requests }) {
        Ok(Reply::Batch(replies)) => replies,
        Ok(other) => bail!("the controller sent an unexpected reply: {other:?}"),
        Err(e) => {
            let total = plan.steps.len();
            // Only a refusal says for sure that nothing happened (not, say, a daemon gone mid-call).
            return Err(match e.downcast_ref::<BatchRefused>().and_then(|r| step_of.get(r.index)) {
                Some(&i) => anyhow!("change {} of {total} ({}) failed: {e}; nothing was applied", i + 1, plan.steps[i]),
                None => e,
            });
        }
    };
    report.applied = plan.steps.len();

    let mut handouts = device_keys.into_iter().zip(configs);
    let mut undelivered = Vec::new();
    for reply in replies {
        match reply {
            Reply::Invite(issued) => report.invites.push(NewInvite { name: issued.invite.name, token: issued.token }),
            Reply::DeviceHandout(handout) => {
                let name = handout.device.name.clone();
                let written = match handouts.next() {
                    Some((key, config)) => {
                        let device = device_config(&key, &handout);
                        // Never hand out a config that would not read back as itself.
                        match device.validate() {
                            Ok(()) => config.write(&device.to_wg_quick()),
                            Err(e) => Err(anyhow!("refusing to hand out the device config: {e}")),
                        }
                    }
                    None => Err(anyhow!("no key pair or config file was prepared for device {name}")),
                };
                match written {
                    Ok(path) => report.configs.push(NewConfig {
                        device: name,
                        address: handout.device.address.to_string(),
                        address_v6: handout.device.address_v6.to_string(),
                        path,
                    }),
                    Err(e) => {
                        // A device whose config cannot be handed out is of no use: take it back.
                        match send(g, Request::DeviceRemove { name: name.clone() }) {
                            Ok(_) => {
                                report.applied -= 1;
                                undelivered.push(format!("device {name} (taken back): {e:#}"));
                            }
                            Err(removal) => undelivered.push(format!(
                                "device {name}: {e:#}; taking it back failed too ({removal:#}): remove it with `meshctl device remove {name}`"
                            )),
                        }
                    }
                }
            }
            _ => {}
        }
    }
    match undelivered.is_empty() {
        true => Ok(()),
        false => bail!("applied, but some device configs could not be written: {}", undelivered.join("; ")),
    }
}

/// Where a new device's config goes: `DIR/NAME.conf`, which must not exist yet.
fn config_path(dir: &Path, name: &Label) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        bail!("--out-dir {} is not a directory", dir.display());
    }
    let path = dir.join(format!("{name}.conf"));
    if fs::symlink_metadata(&path).is_ok() {
        bail!(
            "{} exists; refusing to overwrite the config of another device (move it away or use --out-dir)",
            path.display()
        );
    }
    Ok(path)
}

/// A device's wg-quick config file: created empty (0600) under a temporary name before anything changes,
/// put in place without replacing anything once the device exists, removed if never written.
struct ConfigFile {
    path: PathBuf,
    tmp: PathBuf,
}

impl ConfigFile {
    fn create(name: Label, path: PathBuf) -> anyhow::Result<ConfigFile> {
        let tmp = path.with_file_name(format!(".{name}.conf.{}.tmp", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(ConfigFile { path, tmp })
    }

    fn write(self, text: &str) -> anyhow::Result<PathBuf> {
        let mut file = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.tmp)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        // A hard link fails if the name was taken meanwhile, where a rename would replace it; a file
        // system without hard links (vfat) gets a rename after a last check.
        match fs::hard_link(&self.tmp, &self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("{} appeared meanwhile; refusing to overwrite it", self.path.display())
            }
            Err(_) if fs::symlink_metadata(&self.path).is_err() => {
                fs::rename(&self.tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("writing {}", self.path.display())),
        }
        Ok(self.path.clone())
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}
