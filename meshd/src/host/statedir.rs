//! The state directory of a host: where its database, private key, admin socket and lock live.
//!
//! Layout: `meshd.db` (0600) on the controller or `member.json` (0600) on a member, `private.key` (0600)
//! and, during a key rotation, `private.key.next` (0600), `peer-endpoints.json` (0600: where peers were last
//! seen), `meshd.sock` (0600, only while the daemon runs), `meshd.lock`. The directory itself is 0700.
//!
//! Files are replaced whole: written to a temporary file (0600, created exclusively under an
//! unpredictable name, so nothing planted under a name can be followed or reused), synced, renamed over
//! the old one, so a full disk or a crash never leaves an empty or cut file behind. A member runs on a
//! full or read-only directory too; [`StateDir::log_save`] says once what it cannot save.
//!
//! Root acts only on what root controls: [`StateDir::check_private`] refuses (as OpenSSH's StrictModes
//! does) a state directory, or an entry in it, owned by another user or writable by others, a symbolic
//! link in it, and a directory above it that another user could rename it out of.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{debug, info, warn};

use meshd_core::keys::PrivateKey;
use meshd_core::reconcile::PeerEndpoints;
use meshd_core::wire::join::MemberState;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";

/// Problems with the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("{0} is not empty and holds no meshd network; use a new or empty directory")]
    NotEmpty(PathBuf),
    #[error("{0} already holds a meshd network; refusing to overwrite it")]
    AlreadyInitialized(PathBuf),
    /// The reason is in this error's message, not its source chain, so that a chain printed whole (`{:#}`)
    /// says it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0} is readable by other users (mode {1:o}); it must be 0600")]
    KeyMode(PathBuf, u32),
    #[error("{0} does not hold a WireGuard private key")]
    BadKey(PathBuf),
    #[error("another meshd is already running on {0}")]
    Busy(PathBuf),
    #[error("{0} is damaged: {1}")]
    BadMemberState(PathBuf, String),
    #[error("{0} is read-only: the controller keeps its database there and must write it; remount it read-write")]
    ReadOnly(PathBuf),
    #[error(
        "state directory {dir} is owned by uid {owner}, not by {runner} who runs meshd: copy it into new files of {runner}'s (a chown leaves them writable through descriptors their owner opened before): `sudo cp -RT {dir} {dir}.new && sudo chown -R {chown}: {dir}.new && sudo rm -rf {dir} && sudo mv -T {dir}.new {dir}` (or run meshd as that user)"
    )]
    NotOwned { dir: PathBuf, owner: u32, runner: String, chown: String },
    #[error(
        "{path} in state directory {dir} is owned by uid {owner}, not by {runner} who runs meshd: copy it into new files of {runner}'s (a chown leaves them writable through descriptors their owner opened before): `sudo cp -RT {dir} {dir}.new && sudo chown -R {chown}: {dir}.new && sudo rm -rf {dir} && sudo mv -T {dir}.new {dir}` (or run meshd as that user)"
    )]
    EntryNotOwned { path: PathBuf, dir: PathBuf, owner: u32, runner: String, chown: String },
    #[error("{path} is writable by other users (mode {mode:o}): run `chmod go-w {path}`")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{0} is a symbolic link: meshd follows none in its state directory; remove it")]
    Link(PathBuf),
    #[error("{0} is a {1}, not a file: meshd makes none in its state directory; remove it")]
    NotAFile(PathBuf, &'static str),
    #[error(
        "{parent}, which holds state directory {dir}, is {why}: whoever can write it can swap the state directory; copy it somewhere only {runner} controls into new files of {runner}'s, e.g. `sudo mkdir -m 0700 /var/lib/meshd && sudo cp -RT {dir} /var/lib/meshd && sudo chown -R {chown}: /var/lib/meshd && sudo rm -rf {dir}`"
    )]
    UnsafeParent { parent: PathBuf, dir: PathBuf, why: String, runner: String, chown: String },
}

/// Who runs meshd: the effective uid, as a refusal names it ("root", "uid N") and as `chown` takes it.
fn who_runs() -> (u32, String, String) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if me == 0 { (me, "root".to_owned(), "root".to_owned()) } else { (me, format!("uid {me}"), me.to_string()) }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateDirError + '_ {
    move |error| StateDirError::Io { path: path.to_path_buf(), error }
}

/// Read a private key file, refusing one other users can read, and anything but a file: opened without
/// following a link and without blocking (a FIFO planted under the name would hang the open), then read from
/// that same open file.
fn read_key_file(path: &Path) -> Result<PrivateKey, StateDirError> {
    use std::io::Read as _;
    let mut file = open_private(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io(path))?;
    PrivateKey::from_base64(&text).map_err(|_| StateDirError::BadKey(path.to_path_buf()))
}

/// Open a private file for reading: no link followed, no FIFO blocked on, nothing readable by others taken.
fn open_private(path: &Path) -> Result<File, StateDirError> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
        |e| match e.raw_os_error() {
            Some(libc::ELOOP) => StateDirError::Link(path.to_path_buf()),
            _ => io(path)(e),
        },
    )?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(StateDirError::NotAFile(path.to_path_buf(), kind_of(&meta.file_type())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StateDirError::KeyMode(path.to_path_buf(), mode));
    }
    Ok(file)
}

/// What a file type that is not a regular file is, in words.
fn kind_of(kind: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if kind.is_dir() {
        "directory"
    } else if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

/// Paths inside one state directory, and what could not be saved there lately (shared by clones).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    /// Files whose last save failed: their next failure is not worth another warning.
    unsaved: Arc<Mutex<BTreeSet<PathBuf>>>,
}

/// A held lock on the state directory; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    read_only: bool,
}

impl StateLock {
    fn new(file: File) -> StateLock {
        StateLock { _file: file, read_only: false }
    }

    /// True when the state directory is on a read-only file system (the lock file could not be opened
    /// for writing): nothing can be saved there.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

impl StateDir {
    /// The state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into(), unsaved: Arc::default() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The controller database.
    pub fn db(&self) -> PathBuf {
        self.root.join("meshd.db")
    }

    /// This host's WireGuard private key.
    pub fn private_key(&self) -> PathBuf {
        self.root.join("private.key")
    }

    /// What a member host knows of its network (written by `meshd join`).
    pub fn member_state(&self) -> PathBuf {
        self.root.join("member.json")
    }

    /// The admin socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("meshd.sock")
    }

    /// Whether the directory's lock file exists (a daemon or meshctl has run on it).
    pub fn has_lock_file(&self) -> bool {
        fs::symlink_metadata(self.lock_path()).is_ok()
    }

    fn lock_path(&self) -> PathBuf {
        self.root.join("meshd.lock")
    }

    /// Check that the directory can hold a new network or membership: new, or empty, and safe as
    /// [`StateDir::check_private`] says (a new one: the directories it would be made in).
    pub fn check_new(&self) -> Result<(), StateDirError> {
        if self.db().exists() || self.member_state().exists() {
            return Err(StateDirError::AlreadyInitialized(self.root.clone()));
        }
        match fs::read_dir(&self.root) {
            Ok(mut entries) => match entries.next() {
                Some(_) => Err(StateDirError::NotEmpty(self.root.clone())),
                None => self.check_private(),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The nearest directory that exists, where it would be made, and those above it.
                let absolute = std::path::absolute(&self.root).map_err(io(&self.root))?;
                let existing = absolute.ancestors().skip(1).find(|a| a.exists()).unwrap_or(Path::new("/"));
                let real = fs::canonicalize(existing).map_err(io(existing))?;
                self.check_parents(real.ancestors())
            }
            Err(e) => Err(io(&self.root)(e)),
        }
    }

    /// Make the directory (0700) for a new network or membership; it must be new or empty, and (once
    /// made) pass [`StateDir::check_private`].
    pub fn create(&self) -> Result<(), StateDirError> {
        self.check_new()?;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.root).map_err(io(&self.root))?;
        // An empty directory someone else made and owns is theirs to fill: refused before it is touched.
        self.check_private()?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700)).map_err(io(&self.root))
    }

    /// Refuse a state directory that another local user could have planted something in or could
    /// still change, as OpenSSH's StrictModes does: the directory and every entry in it must be owned by
    /// the user running meshd and not writable by group or others, no entry may be a symbolic link, and
    /// every directory above it must be owned by root or that user and not writable by others (unless
    /// sticky, as `/tmp` is: no one else can rename an entry out of it). Each refusal is one line saying
    /// how to fix it.
    pub fn check_private(&self) -> Result<(), StateDirError> {
        let (me, runner, chown) = who_runs();
        let dir = &self.root;
        let real = fs::canonicalize(dir).map_err(io(dir))?;
        // The parents first: their fix (moving the directory) comes with the rest of it in one message.
        self.check_parents(real.ancestors().skip(1))?;
        let meta = fs::metadata(&real).map_err(io(dir))?;
        if meta.uid() != me {
            return Err(StateDirError::NotOwned { dir: dir.clone(), owner: meta.uid(), runner, chown });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(StateDirError::Writable { path: dir.clone(), mode: meta.mode() & 0o7777 });
        }
        for entry in fs::read_dir(&real).map_err(io(dir))? {
            let path = dir.join(entry.map_err(io(dir))?.file_name());
            let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
            if meta.file_type().is_symlink() {
                return Err(StateDirError::Link(path));
            }
            // Files, directories (the operator's; meshd reads none as a file), and the admin socket a stopped
            // daemon may have left; a FIFO or a device would make a reader block or read what it is not meant to.
            let socket = std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type());
            let admin_socket = socket && path.file_name() == self.socket().file_name();
            if !(meta.is_file() || meta.is_dir() || admin_socket) {
                return Err(StateDirError::NotAFile(path, kind_of(&meta.file_type())));
            }
            if meta.uid() != me {
                return Err(StateDirError::EntryNotOwned { path, dir: dir.clone(), owner: meta.uid(), runner, chown });
            }
            if meta.mode() & 0o022 != 0 {
                return Err(StateDirError::Writable { path, mode: meta.mode() & 0o7777 });
            }
        }
        Ok(())
    }

    /// Refuse a directory above the state directory (`parents`, resolved) that another user owns or
    /// that others may write without the sticky bit: its owner or writers could rename the state
    /// directory away and put one of theirs in its place.
    fn check_parents<'a>(&self, parents: impl Iterator<Item = &'a Path>) -> Result<(), StateDirError> {
        let (me, runner, chown) = who_runs();
        for parent in parents {
            let meta = fs::metadata(parent).map_err(io(parent))?;
            let why = if meta.uid() != 0 && meta.uid() != me {
                format!("owned by uid {}", meta.uid())
            } else if meta.mode() & 0o022 != 0 && meta.mode() & libc::S_ISVTX == 0 {
                format!("writable by other users (mode {:o})", meta.mode() & 0o7777)
            } else {
                continue;
            };
            return Err(StateDirError::UnsafeParent {
                parent: parent.to_path_buf(),
                dir: self.root.clone(),
                why,
                runner,
                chown,
            });
        }
        Ok(())
    }

    /// Undo `create` after a failed init: remove what init wrote, and the directory if it is then empty.
    pub fn remove_new(&self) {
        for path in [self.db(), self.private_key(), self.member_state(), self.lock_path()] {
            let _ = fs::remove_file(path);
        }
        let _ = fs::remove_dir(&self.root);
    }

    /// Write a new private key file (0600); never overwrites.
    pub fn write_private_key(&self, key: &PrivateKey) -> Result<(), StateDirError> {
        let path = self.private_key();
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io(&path))?;
        writeln!(file, "{}", key.to_base64()).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))
    }

    /// Where a member keeps the key it made for a rotation until the network has taken it.
    pub fn next_private_key(&self) -> PathBuf {
        self.root.join("private.key.next")
    }

    /// Write the key made for a rotation (0600, replacing an abandoned one atomically). On failure (a
    /// full or read-only file system) there is no new file, and an abandoned one is left as it was.
    pub fn write_next_private_key(&self, key: &PrivateKey) -> Result<(), StateDirError> {
        self.replace_private_file(&self.next_private_key(), format!("{}\n", key.to_base64()).as_bytes())
    }

    /// The key made for a rotation, if one is pending. An empty, cut or foreign file (left by a version
    /// that wrote it in place on a full disk) is [`StateDirError::BadKey`].
    pub fn read_next_private_key(&self) -> Result<Option<PrivateKey>, StateDirError> {
        let path = self.next_private_key();
        if !path.exists() {
            return Ok(None);
        }
        read_key_file(&path).map(Some)
    }

    /// The network has the new key: it becomes this host's key (atomically replacing the old one). On
    /// failure (a read-only file system) both files are as they were.
    pub fn promote_next_private_key(&self) -> Result<(), StateDirError> {
        let path = self.private_key();
        fs::rename(self.next_private_key(), &path).map_err(io(&path))?;
        // Done once renamed: a failed sync of the directory must not have the rename tried again.
        if let Err(e) = File::open(&self.root).and_then(|dir| dir.sync_all()) {
            warn!(dir = %self.root.display(), error = %e, "syncing the state directory after the key switch");
        }
        Ok(())
    }

    /// Forget an abandoned rotation (none saved is fine).
    pub fn discard_next_private_key(&self) -> Result<(), StateDirError> {
        let path = self.next_private_key();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Save what this member host knows of its network (0600, replaced atomically).
    pub fn write_member_state(&self, state: &MemberState) -> Result<(), StateDirError> {
        let path = self.member_state();
        let json = serde_json::to_vec_pretty(state).map_err(|e| io(&path)(e.into()))?;
        self.replace_private_file(&path, &json)
    }

    /// Where peers were last seen: kept so that after a restart this host can renew the tunnel to a
    /// peer behind NAT itself (its NAT still maps the peer's side) instead of waiting for the peer.
    pub fn peer_endpoints(&self) -> PathBuf {
        self.root.join("peer-endpoints.json")
    }

    /// Save where peers were last seen (0600, replaced atomically).
    pub fn write_peer_endpoints(&self, endpoints: &PeerEndpoints) -> Result<(), StateDirError> {
        let path = self.peer_endpoints();
        let json = serde_json::to_vec_pretty(endpoints).map_err(|e| io(&path)(e.into()))?;
        self.replace_private_file(&path, &json)
    }

    /// Where peers were last seen; none if never saved. A damaged file is only a lost hint: logged and
    /// ignored.
    pub fn read_peer_endpoints(&self) -> PeerEndpoints {
        let path = self.peer_endpoints();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring unreadable peer endpoints");
                PeerEndpoints::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PeerEndpoints::new(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring unreadable peer endpoints");
                PeerEndpoints::new()
            }
        }
    }

    /// Replace `path` with `bytes` atomically, mode 0600: a new temporary file, written and synced, is
    /// renamed over it and the directory synced. The temporary file is created exclusively (`O_EXCL`,
    /// which follows no link) under a random name, by `tempfile`. On any failure the temporary file is
    /// removed and `path` is as it was.
    pub fn replace_private_file(&self, path: &Path, bytes: &[u8]) -> Result<(), StateDirError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
        let dir = path.parent().unwrap_or(&self.root);
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(io(dir))?;
        let tmp_path = tmp.path().to_path_buf();
        tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).map_err(io(&tmp_path))?;
        // On failure the returned temporary file is dropped, which removes it.
        tmp.persist(path).map_err(|e| io(path)(e.error))?;
        File::open(dir).and_then(|dir| dir.sync_all()).map_err(io(dir))
    }

    /// Where ACME account keys and certificates with their keys are kept (0700; each file 0600).
    pub fn acme_dir(&self) -> PathBuf {
        self.root.join("acme")
    }

    /// Make [`StateDir::acme_dir`] if it is missing (0700, whatever the umask).
    pub fn create_acme_dir(&self) -> Result<(), StateDirError> {
        let dir = self.acme_dir();
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// The bytes of a private file meshd wrote (a certificate's key, an ACME account): `None` if it does not
    /// exist. Refused like the WireGuard key when it is a link, not a file, or readable by others.
    pub fn read_private_file(&self, path: &Path) -> Result<Option<Vec<u8>>, StateDirError> {
        match open_private(path) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut bytes).map_err(io(path))?;
                Ok(Some(bytes))
            }
            Err(StateDirError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Log the outcome of saving `path` (holding `what`, for the operator) without repeating itself: the
    /// first failure is a warning, the next ones debug lines, and the first success after them says so.
    pub fn log_save(&self, path: &Path, what: &str, saved: &Result<(), StateDirError>) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(PoisonError::into_inner);
        match saved {
            Ok(()) => {
                if unsaved.remove(path) {
                    info!(path = %path.display(), "saved {what} again");
                }
            }
            Err(e) if unsaved.insert(path.to_path_buf()) => warn!(error = %e, "cannot save {what}; trying again later"),
            Err(e) => debug!(error = %e, "still cannot save {what}"),
        }
    }

    /// Say once that this member's state directory is read-only and what it therefore cannot save; the
    /// failures to save those files are then not reported again (see [`StateDir::log_save`]).
    pub fn warn_read_only_member(&self) {
        warn!(
            dir = %self.root.display(),
            "the state directory is read-only: running from the cached state and keys; until it is writable again, \
             meshd cannot save the network's changes (member.json), where peers were last seen \
             (peer-endpoints.json) nor a new key (private.key.next: key rotations wait)"
        );
        let mut unsaved = self.unsaved.lock().unwrap_or_else(PoisonError::into_inner);
        unsaved.extend([self.member_state(), self.peer_endpoints(), self.next_private_key()]);
    }

    /// What this member host knows of its network.
    pub fn read_member_state(&self) -> Result<MemberState, StateDirError> {
        let path = self.member_state();
        let text = fs::read(&path).map_err(io(&path))?;
        let member: MemberState =
            serde_json::from_slice(&text).map_err(|e| StateDirError::BadMemberState(path.clone(), e.to_string()))?;
        member.state.check().map_err(|e| StateDirError::BadMemberState(path, e))?;
        Ok(member)
    }

    /// Read this host's private key, refusing a file other users can read.
    pub fn read_private_key(&self) -> Result<PrivateKey, StateDirError> {
        read_key_file(&self.private_key())
    }

    /// The daemon's exclusive lock: refused at once while another daemon holds it; waits briefly for
    /// `meshctl` calls working offline (shared holders) to finish. On a read-only file system the lock
    /// file is opened for reading (flock works on it), or, if it was never made, the directory itself is
    /// locked; [`StateLock::read_only`] then says so.
    pub fn lock_daemon(&self) -> Result<StateLock, StateDirError> {
        let (file, read_only) = match self.open_lock() {
            Ok(file) => (file, false),
            Err(StateDirError::Io { error, .. }) if error.kind() == ErrorKind::ReadOnlyFilesystem => {
                let file = match File::open(self.lock_path()) {
                    Err(e) if e.kind() == ErrorKind::NotFound => File::open(&self.root).map_err(io(&self.root))?,
                    opened => opened.map_err(io(&self.lock_path()))?,
                };
                (file, true)
            }
            Err(e) => return Err(e),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(StateLock { _file: file, read_only }),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(io(&self.lock_path())(e)),
            }
            // A shared lock succeeds only if the holders are offline meshctl calls, not a daemon.
            let only_readers = file.try_lock_shared().is_ok();
            let _ = file.unlock();
            if !only_readers || std::time::Instant::now() > deadline {
                return Err(StateDirError::Busy(self.root.clone()));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A shared lock for `meshctl` working on the database itself; `None` when a daemon runs.
    pub fn lock_offline(&self) -> Result<Option<StateLock>, StateDirError> {
        let file = self.open_lock()?;
        match file.try_lock_shared() {
            Ok(()) => Ok(Some(StateLock::new(file))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io(&self.lock_path())(e)),
        }
    }

    /// An exclusive lock that `meshctl` holds from previewing a device's hand-out to committing it, so
    /// that two hand-outs on this state directory do not race for one address (waits for the other).
    /// It locks the directory itself, so it creates no file.
    pub fn lock_hand_out(&self) -> Result<StateLock, StateDirError> {
        let dir = File::open(&self.root).map_err(io(&self.root))?;
        dir.lock().map_err(io(&self.root))?;
        Ok(StateLock::new(dir))
    }

    fn open_lock(&self) -> Result<File, StateDirError> {
        let path = self.lock_path();
        open_lock_file(&path).map_err(io(&path))
    }
}

/// Open (or create) the lock file `path`, 0600, keeping what it holds: whoever can open a file can hold
/// a `flock` on it (no write access needed), so no other user may. A symbolic link there is not
/// followed (`ELOOP`): it was planted.
pub fn open_lock_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use meshd_core::fixtures::named_key;

    use super::*;

    #[test]
    fn creates_private_directory_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("state"));
        dir.create().unwrap();
        assert_eq!(fs::metadata(dir.root()).unwrap().permissions().mode() & 0o777, 0o700);
        let key = PrivateKey::generate();
        dir.write_private_key(&key).unwrap();
        assert_eq!(fs::metadata(dir.private_key()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(dir.read_private_key().unwrap().public_key(), key.public_key());
        assert!(dir.write_private_key(&key).is_err(), "never overwrites a key");
        fs::set_permissions(dir.private_key(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(dir.read_private_key(), Err(StateDirError::KeyMode(_, 0o644))));
    }

    #[test]
    fn a_cached_state_with_an_address_outside_the_range_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let mut member =
            MemberState { me: "vps".parse().unwrap(), state: meshd_core::fixtures::sample_state(), hub: None };
        dir.write_member_state(&member).unwrap();
        assert_eq!(dir.read_member_state().unwrap(), member);
        member.state.nodes[1].index = u32::MAX;
        dir.write_member_state(&member).unwrap();
        let e = dir.read_member_state().unwrap_err().to_string();
        assert!(e.contains("member.json") && e.contains("outside 10.77.0.0/16"), "{e}");
    }

    /// Issue 11, point 5: an interface name edited into `member.json` never reaches `ip` or nftables.
    #[test]
    fn a_cached_state_with_an_interface_name_that_could_break_out_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let member = MemberState { me: "vps".parse().unwrap(), state: meshd_core::fixtures::sample_state(), hub: None };
        dir.write_member_state(&member).unwrap();
        let text = fs::read_to_string(dir.member_state()).unwrap();
        assert!(text.contains(r#""interface": "meshd0""#), "{text}");
        write_private(&dir.member_state(), &text.replace(r#""meshd0""#, r#""x\" drop; iifname \"x""#));
        let e = dir.read_member_state().unwrap_err().to_string();
        assert!(e.contains("member.json is damaged") && e.contains("interface name") && e.contains("drop;"), "{e}");
        let mut member = member;
        member.state.nodes[0].listen_port = 0;
        dir.write_member_state(&member).unwrap();
        let e = dir.read_member_state().unwrap_err().to_string();
        assert!(e.contains("member.json is damaged") && e.contains("listens on port 0"), "{e}");
    }

    #[test]
    fn peer_endpoints_round_trip_privately_and_damage_is_only_a_lost_hint() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        assert!(dir.read_peer_endpoints().is_empty(), "none saved yet");
        let seen = PeerEndpoints::from([(named_key("KEY"), "192.0.2.7:40123".parse().unwrap())]);
        dir.write_peer_endpoints(&seen).unwrap();
        assert_eq!(fs::metadata(dir.peer_endpoints()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(dir.read_peer_endpoints(), seen);
        fs::write(dir.peer_endpoints(), "{not json").unwrap();
        assert!(dir.read_peer_endpoints().is_empty());
    }

    #[test]
    fn a_pending_key_is_written_whole_or_not_at_all_and_a_damaged_one_is_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        assert!(dir.read_next_private_key().unwrap().is_none());
        dir.discard_next_private_key().unwrap();
        let key = PrivateKey::generate();
        dir.write_next_private_key(&key).unwrap();
        assert_eq!(fs::metadata(dir.next_private_key()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(dir.read_next_private_key().unwrap(), Some(key.clone()));
        // A write that fails (here the rename, onto a directory) leaves no file of its own behind.
        dir.discard_next_private_key().unwrap();
        fs::create_dir_all(dir.next_private_key().join("in-the-way")).unwrap();
        assert!(dir.write_next_private_key(&key).is_err());
        fs::remove_dir_all(dir.next_private_key()).unwrap();
        let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // What a write in place left on a full disk, or any other damage, reads as no key.
        for damaged in ["", "not a key\n", &key.to_base64()[..20]] {
            write_private(&dir.next_private_key(), damaged);
            assert!(matches!(dir.read_next_private_key(), Err(StateDirError::BadKey(_))), "{damaged:?}");
        }
    }

    fn write_private(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Issue 11, point 5: whoever may write the state directory can plant a link (to a file of root's)
    /// or a directory under the name a temporary file had; root's write neither follows nor trips on it.
    #[test]
    fn a_replaced_file_never_follows_nor_trips_on_what_was_planted_under_a_temporary_name() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("roots-file");
        fs::write(&target, "root's own\n").unwrap();
        let dir = StateDir::new(tmp.path().join("state"));
        dir.create().unwrap();
        // The names temporary files had before: fixed, so they could be planted in advance.
        std::os::unix::fs::symlink(&target, dir.root().join(".member.json.tmp")).unwrap();
        std::os::unix::fs::symlink(&target, dir.root().join(".private.key.next.tmp")).unwrap();
        fs::create_dir(dir.root().join(".peer-endpoints.json.tmp")).unwrap();
        let member = MemberState { me: "vps".parse().unwrap(), state: meshd_core::fixtures::sample_state(), hub: None };
        dir.write_member_state(&member).unwrap();
        dir.write_next_private_key(&PrivateKey::generate()).unwrap();
        let seen = PeerEndpoints::from([(named_key("KEY"), "192.0.2.7:40123".parse().unwrap())]);
        dir.write_peer_endpoints(&seen).expect("a directory under the old temporary name does not stop a save");
        assert_eq!(fs::read_to_string(&target).unwrap(), "root's own\n", "the link's target was written");
        assert_eq!(dir.read_member_state().unwrap(), member);
        assert_eq!(dir.read_peer_endpoints(), seen);
        for file in [dir.member_state(), dir.peer_endpoints(), dir.next_private_key()] {
            let meta = fs::symlink_metadata(&file).unwrap();
            assert!(meta.is_file() && meta.permissions().mode() & 0o777 == 0o600, "{}", file.display());
        }
        // No temporary file is left behind, and a lock file planted as a link is not followed.
        let names: Vec<String> =
            fs::read_dir(dir.root()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.iter().filter(|n| n.ends_with(".tmp")).count(), 3, "only the planted ones: {names:?}");
        std::os::unix::fs::symlink(&target, dir.root().join("meshd.lock")).unwrap();
        assert!(dir.lock_daemon().is_err(), "a planted lock link is refused");
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o644);
    }

    /// Issue 11, point 5: a state directory someone else could have planted in, or could still change,
    /// is refused in one line that says how to fix it.
    #[test]
    fn a_state_directory_others_own_or_may_write_is_refused_saying_how_to_fix_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("state"));
        dir.create().unwrap();
        fs::write(dir.db(), "").unwrap();
        fs::set_permissions(dir.db(), fs::Permissions::from_mode(0o600)).unwrap();
        dir.check_private().expect("a private directory passes");

        fs::set_permissions(dir.root(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = dir.check_private().unwrap_err().to_string();
        assert!(e.contains("is writable by other users (mode 777)") && e.contains("chmod go-w"), "{e}");
        fs::set_permissions(dir.root(), fs::Permissions::from_mode(0o700)).unwrap();

        fs::set_permissions(dir.db(), fs::Permissions::from_mode(0o666)).unwrap();
        let e = dir.check_private().unwrap_err().to_string();
        assert!(e.contains("meshd.db is writable by other users (mode 666)"), "{e}");
        fs::set_permissions(dir.db(), fs::Permissions::from_mode(0o600)).unwrap();

        std::os::unix::fs::symlink("/etc/passwd", dir.root().join("meshd.db-wal")).unwrap();
        let e = dir.check_private().unwrap_err().to_string();
        assert!(e.contains("meshd.db-wal is a symbolic link"), "{e}");
        fs::remove_file(dir.root().join("meshd.db-wal")).unwrap();

        // A FIFO (as `cp -R` recreates one from a user's copy) would hang the reader: refused, by the check and
        // by the key's reader itself, at once.
        let key = dir.private_key();
        let had_key = key.exists();
        if had_key {
            fs::rename(&key, dir.root().join("key.saved")).unwrap();
        }
        let fifo = std::ffi::CString::new(key.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path; it only creates the FIFO.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = dir.check_private().unwrap_err().to_string();
        assert!(e.contains("private.key is a FIFO, not a file") && e.contains("remove it"), "{e}");
        let started = std::time::Instant::now();
        let e = read_key_file(&key).unwrap_err().to_string();
        assert!(e.contains("is a FIFO") && started.elapsed() < std::time::Duration::from_secs(1), "{e}");
        fs::remove_file(&key).unwrap();
        if had_key {
            fs::rename(dir.root().join("key.saved"), &key).unwrap();
        }
        // A directory of the operator's (configs written next to the state) is fine; read as the key, refused.
        fs::create_dir(dir.root().join("out")).unwrap();
        dir.check_private().expect("a directory of root's in the state directory");
        fs::remove_dir(dir.root().join("out")).unwrap();
        if !had_key {
            fs::create_dir(&key).unwrap();
            let e = read_key_file(&key).unwrap_err().to_string();
            assert!(e.contains("private.key is a directory, not a file"), "{e}");
            fs::remove_dir(&key).unwrap();
        }
        // The admin socket a killed daemon left behind is fine.
        let _left = std::os::unix::net::UnixListener::bind(dir.socket()).unwrap();
        dir.check_private().expect("a leftover admin socket");
        fs::remove_file(dir.socket()).unwrap();

        // A directory above it that others may write (not sticky, as /tmp is) could swap it.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = dir.check_private().unwrap_err().to_string();
        assert!(e.contains("which holds state directory") && e.contains("writable by other users"), "{e}");
        // So is a new one to be made there (`meshd join` checks before it spends its token), untouched.
        let new = StateDir::new(tmp.path().join("new").join("state"));
        let e = new.check_new().unwrap_err().to_string();
        assert!(e.contains("which holds state directory") && e.contains("writable by other users"), "{e}");
        assert!(new.create().is_err() && !tmp.path().join("new").exists());
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        dir.check_private().expect("a sticky directory above it (as /tmp) is fine");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();

        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(dir.db(), Some(65534), None).unwrap();
            let e = dir.check_private().unwrap_err().to_string();
            assert!(e.contains("meshd.db in state directory") && e.contains("owned by uid 65534"), "{e}");
            std::os::unix::fs::chown(dir.db(), Some(0), None).unwrap();
            std::os::unix::fs::chown(dir.root(), Some(65534), None).unwrap();
            let e = dir.check_private().unwrap_err().to_string();
            let shown = dir.root().display();
            let fix =
                format!("`sudo cp -RT {shown} {shown}.new && sudo chown -R root: {shown}.new && sudo rm -rf {shown}");
            assert!(e.contains("is owned by uid 65534, not by root who runs meshd") && e.contains(&fix), "{e}");
            std::os::unix::fs::chown(tmp.path(), Some(65534), None).unwrap();
            std::os::unix::fs::chown(dir.root(), Some(0), None).unwrap();
            let e = dir.check_private().unwrap_err().to_string();
            assert!(e.contains("is owned by uid 65534: whoever can write it can swap"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn refuses_non_empty_or_initialized_directories() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
        assert!(matches!(StateDir::new(tmp.path()).create(), Err(StateDirError::NotEmpty(_))));
        fs::write(tmp.path().join("meshd.db"), "").unwrap();
        assert!(matches!(StateDir::new(tmp.path()).create(), Err(StateDirError::AlreadyInitialized(_))));
    }

    #[test]
    fn daemon_lock_excludes_offline_writers_and_other_daemons() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let shared = dir.lock_offline().unwrap().expect("free");
        let shared2 = dir.lock_offline().unwrap().expect("shared locks coexist");
        drop((shared, shared2));
        let daemon = dir.lock_daemon().unwrap();
        assert!(dir.lock_offline().unwrap().is_none());
        assert!(matches!(dir.lock_daemon(), Err(StateDirError::Busy(_))));
        drop(daemon);
        assert!(dir.lock_offline().unwrap().is_some());
    }
}
