//! Where a device's config goes: standard output, a FIFO or terminal written in place, or a regular
//! file. A regular file is staged whole (0600, synced) under a random temporary name (created
//! exclusively, following no link) in its own directory before the change that hands the config out is
//! committed, and put in place after it, so that a failed write changes nothing and a committed change
//! never loses its key. Nothing but a regular file
//! is ever replaced: symbolic links to regular files are refused, FIFOs and character devices (a
//! terminal, `/dev/null`, `/proc/self/fd/1`) are written to as they are.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use meshd_core::handout;

/// What is written: the wg-quick text, or a QR code of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Conf,
    Png,
    Svg,
    /// A QR code for the terminal (standard output only).
    TerminalQr,
}

impl Format {
    fn bytes(self, text: &str) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Format::Conf => text.as_bytes().to_vec(),
            Format::Png => handout::qr_png(text)?,
            Format::Svg => handout::qr_svg(text)?.into_bytes(),
            Format::TerminalQr => handout::qr_terminal(text)?.into_bytes(),
        })
    }
}

/// What an existing regular file at an output path gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replaced atomically by the new file (0600): `device add` and `device rotate`.
    Replace,
    /// Refused before anything changes, and not replaced should it appear meanwhile: `apply`, whose
    /// file names come from device names.
    Refuse,
}

/// One output, resolved (and, for a FIFO or device, opened) before anything is written.
pub struct Output {
    /// As the operator gave it, for messages.
    path: PathBuf,
    format: Format,
    target: Target,
}

enum Target {
    Stdout,
    /// A FIFO or character device, open for writing.
    Stream(File),
    /// A regular file, new or existing, and its staged copy once written.
    File {
        existing: Existing,
        staged: Option<PathBuf>,
    },
}

impl Output {
    /// Standard output.
    pub fn stdout(format: Format) -> Output {
        Output { path: PathBuf::from("-"), format, target: Target::Stdout }
    }

    /// Resolve `path` (`-` is standard output). Opening a FIFO waits for its reader.
    pub fn open(path: &Path, format: Format, existing: Existing) -> anyhow::Result<Output> {
        if path.as_os_str() == "-" {
            return Ok(Output::stdout(format));
        }
        let shown = path.display();
        if path.as_os_str().as_bytes().ends_with(b"/") {
            bail!("{shown} is not a file path (it ends with /): name the file");
        }
        // Nothing that exists is written over by `apply`, whatever it is: a FIFO or device there would
        // take the config in place of the file the report names.
        if existing == Existing::Refuse && fs::symlink_metadata(path).is_ok() {
            bail!("{shown} exists; refusing to overwrite it (move it away or use --out-dir)");
        }
        let target = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = directory_of(path);
                if !fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
                    bail!("cannot write {shown}: {} is not a directory", dir.display());
                }
                if path.file_name().is_none() {
                    bail!("{shown} is not a file path");
                }
                Target::File { existing, staged: None }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot write {shown}")),
            Ok(meta) if meta.file_type().is_symlink() => {
                // Followed only to a stream (`/dev/stdout`, a link to a FIFO): a link to a file is
                // refused, so that a planted link cannot make a private key land elsewhere.
                match fs::metadata(path) {
                    Ok(m) if is_stream(&m.file_type()) => Target::Stream(open_stream(path, false)?),
                    _ => bail!(
                        "{shown} is a symbolic link; configs hold a private key and are written only to the path \
                         itself, a FIFO or a terminal: give the link's target (or - for standard output)"
                    ),
                }
            }
            Ok(meta) if is_stream(&meta.file_type()) => Target::Stream(open_stream(path, true)?),
            Ok(meta) if meta.is_file() => match existing {
                Existing::Replace => Target::File { existing, staged: None },
                Existing::Refuse => bail!("{shown} exists; refusing to overwrite it (move it away or use --out-dir)"),
            },
            Ok(meta) if meta.is_dir() => bail!("cannot write {shown}: it is a directory"),
            Ok(_) => bail!(
                "cannot write {shown}: it is neither a regular file, a FIFO nor a terminal or other character device"
            ),
        };
        Ok(Output { path: path.to_owned(), format, target })
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The output for messages: its path, or "standard output".
    pub fn shown(&self) -> String {
        match self.target {
            Target::Stdout => "standard output".into(),
            _ => self.path.display().to_string(),
        }
    }

    /// Whether this output is a regular file (staged, then put in place).
    pub fn is_file(&self) -> bool {
        matches!(self.target, Target::File { .. })
    }

    /// What this output gets for the config `text`: the text itself or a QR code of it. Rendered for
    /// every output before any is written, so that one that cannot be made (a QR code too wide for the
    /// terminal) fails before another has the config.
    pub fn render(&self, text: &str) -> anyhow::Result<Vec<u8>> {
        self.format.bytes(text)
    }

    /// Write the file's staged copy of `bytes` (from [`Output::render`]) in full (0600, synced); a
    /// stream is left for [`Output::write_stream`].
    pub fn stage(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Target::File { staged, .. } = &mut self.target else { return Ok(()) };
        if let Some(old) = staged.take() {
            let _ = fs::remove_file(old);
        }
        // Created exclusively (O_EXCL: no link followed, nothing planted reused) under a random name, by
        // `tempfile`; removed on any failure.
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let written = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(directory_of(&self.path))
            .and_then(|mut file| {
                file.write_all(bytes)?;
                file.as_file().sync_all()?;
                file.keep().map_err(|e| e.error)
            });
        let (_, tmp) = written.with_context(|| format!("cannot write {}", self.path.display()))?;
        *staged = Some(tmp);
        Ok(())
    }

    /// Write `bytes` (from [`Output::render`]) to a stream output (standard output, a FIFO, a
    /// terminal); files are left to staging.
    pub fn write_stream(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let written = match &mut self.target {
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Target::Stream(file) => file.write_all(bytes).and_then(|()| file.flush()),
            Target::File { .. } => Ok(()),
        };
        written.with_context(|| format!("cannot write {}", self.shown()))
    }

    /// Put a staged file in place (after the change was committed). On failure the staged copy stays,
    /// complete, and the error names it: the key is not lost.
    pub fn place(&mut self) -> anyhow::Result<()> {
        let Target::File { existing, staged } = &mut self.target else { return Ok(()) };
        let Some(tmp) = staged.take() else { return Ok(()) };
        let placed = match existing {
            Existing::Replace => fs::rename(&tmp, &self.path),
            // A hard link fails if the name was taken meanwhile, where a rename would replace it; a
            // file system without hard links (vfat) gets a rename after a last check.
            Existing::Refuse => match fs::hard_link(&tmp, &self.path) {
                Ok(()) => fs::remove_file(&tmp),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
                Err(_) if fs::symlink_metadata(&self.path).is_err() => fs::rename(&tmp, &self.path),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = placed {
            bail!(
                "the config could not be put at {} ({e}); it is complete in {}: move it there",
                self.path.display(),
                tmp.display()
            );
        }
        // The rename is durable only once the directory is.
        if let Ok(dir) = File::open(directory_of(&self.path)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Keep the staged copy (its name is returned) rather than removing it on drop: for a change whose
    /// outcome is unknown.
    pub fn keep_staged(&mut self) -> Option<PathBuf> {
        match &mut self.target {
            Target::File { staged, .. } => staged.take(),
            _ => None,
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Target::File { staged: Some(tmp), .. } = &self.target {
            let _ = fs::remove_file(tmp);
        }
    }
}

fn is_stream(t: &fs::FileType) -> bool {
    t.is_fifo() || t.is_char_device()
}

/// Open a FIFO or character device for writing, never creating, truncating or replacing it; checked
/// again on the open file, in case the path changed meanwhile.
fn open_stream(path: &Path, no_follow: bool) -> anyhow::Result<File> {
    let mut flags = libc::O_NOCTTY;
    if no_follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let kind = file.metadata().with_context(|| format!("cannot write {}", path.display()))?.file_type();
    if !is_stream(&kind) {
        bail!("{} changed while it was opened; not writing to it", path.display());
    }
    Ok(file)
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A warning for a config file the WireGuard apps would not import under its name, or `None`.
pub fn import_name_warning(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_string_lossy();
    let is_conf = path.extension().is_some_and(|e| e == "conf");
    if is_conf && handout::is_tunnel_name(&stem) {
        return None;
    }
    let suggestion = directory_of(path).join(format!("{}.conf", handout::tunnel_name(&stem)));
    Some(format!(
        "warning: the WireGuard apps import a file as a tunnel named after it, only with a .conf name of 1 to {} \
         characters out of a-z A-Z 0-9 _ = + . - ; {} is not one: rename it, e.g. to {}",
        handout::TUNNEL_NAME_MAX,
        path.display(),
        suggestion.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_the_apps_import_get_no_warning() {
        assert_eq!(import_name_warning(Path::new("out/alice-phone.conf")), None);
        let warned = import_name_warning(Path::new("out/grandmas-living-room-tablet.conf")).unwrap();
        assert!(
            warned.contains(&format!("out/{}.conf", handout::tunnel_name("grandmas-living-room-tablet"))),
            "{warned}"
        );
        assert!(import_name_warning(Path::new("phone.txt")).is_some(), "the apps want .conf");
    }
}
