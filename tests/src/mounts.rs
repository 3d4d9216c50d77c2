//! File systems mounted for one test: [`Tmpfs`], a small tmpfs standing for a full or read-only disk.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{output, run_ok};

/// A tmpfs of a given size mounted on a directory of the test; unmounted on drop (lazily if a process
/// still holds it), also when the test panics. Drop it after the processes that use it.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount` syntax: `512k`, `1m`) on `dir`, made if missing, mode 0700.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(dir));
        Tmpfs { dir: dir.to_path_buf() }
    }

    /// Remounts it read-only (as a failing SD card is) or read-write again.
    pub fn remount(&self, read_only: bool) {
        let how = if read_only { "remount,ro" } else { "remount,rw" };
        run_ok(Command::new("mount").args(["-o", how]).arg(&self.dir));
    }

    /// Remounts it read-write again as process `pid` sees it too: a process started by `ip netns exec`
    /// has its own copy of the mount table, and its copy keeps the read-only flag of the mount it was
    /// started on whatever a remount outside does.
    pub fn remount_writable_for(&self, pid: u32) {
        self.remount(false);
        let target = pid.to_string();
        run_ok(Command::new("nsenter").args(["-t", &target, "-m", "mount", "-o", "remount,rw"]).arg(&self.dir));
    }

    /// Fills it with a file `filler` until no byte more fits; returns the file's path.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let chunk = vec![0u8; 4096];
        loop {
            if let Err(e) = file.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", self.dir.display());
                break;
            }
        }
        // Whatever part of a page is left.
        while file.write(&[0]).is_ok_and(|n| n == 1) {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !output(Command::new("umount").arg(&self.dir)).status.success() {
            let _ = output(Command::new("umount").arg("-l").arg(&self.dir));
        }
    }
}
