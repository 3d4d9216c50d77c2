//! Nix evaluation of the NixOS module (`nixos/module.nix`) with the real nixpkgs `lib`: Debian's `nix-bin`
//! (Nix 2.8, evaluation only) and the library in `$MESHD_NIXPKGS_LIB`, else `../shared/nixpkgs-lib` beside the
//! repository. `tests/nix/eval.nix` holds the stand-in NixOS declarations.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::output;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// The nixpkgs `lib` copy, or None (with a loud SKIPPED line) when it or `nix-instantiate` is missing and `CI`
/// is unset; with `CI` set, a missing one is a failure.
pub fn nixpkgs_lib() -> Option<PathBuf> {
    let lib = std::env::var_os("MESHD_NIXPKGS_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/nixpkgs-lib"));
    let nix = Command::new("nix-instantiate").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if nix && lib.join("lib/default.nix").is_file() {
        return Some(lib);
    }
    let why = format!(
        "needs nix-instantiate (apt-get install nix-bin) and nixpkgs' lib at {} (or $MESHD_NIXPKGS_LIB)",
        lib.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}, and CI is set");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
    None
}

/// A `nix-instantiate` command with `<nixpkgs>` pointing at `lib` and no build users (evaluation only).
pub fn nix_instantiate(lib: &Path) -> Command {
    let mut cmd = Command::new("nix-instantiate");
    cmd.env("NIX_PATH", format!("nixpkgs={}", lib.display())).env("NIX_CONFIG", "build-users-group =");
    cmd
}

/// Evaluates a NixOS configuration (a module file) with the meshd module through `tests/nix/eval.nix`: the
/// rendered declaration, units and firewall as JSON, or the evaluation's error text (the option's name and
/// what it wants, or the failed assertions).
pub fn evaluate(lib: &Path, configuration: &Path) -> Result<serde_json::Value, String> {
    // Read-write mode: the scripts and the declaration the module writes with pkgs.writeText are put in the store
    // (text only, nothing built), so that the harness can read them back.
    let out = output(
        nix_instantiate(lib)
            .args(["--read-write-mode", "--eval", "--strict", "--json"])
            .arg(repo_root().join("tests/nix/eval.nix"))
            .arg("--arg")
            .arg("configuration")
            .arg(configuration),
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("evaluation result is JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The arguments of a unit's `ExecStart=` line as the module writes it (double-quoted JSON strings, `%` and `$`
/// doubled), as systemd passes them to the program.
pub fn exec_args(line: &str) -> Vec<String> {
    serde_json::Deserializer::from_str(line)
        .into_iter::<String>()
        .map(|arg| arg.unwrap_or_else(|e| panic!("{line}: not an Exec line of quoted arguments: {e}")))
        .map(|arg| arg.replace("%%", "%").replace("$$", "$"))
        .collect()
}
