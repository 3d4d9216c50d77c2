//! Files of a test: private (0600) files, and the check that no private key was stored anywhere.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes `text` to `path` with mode 0600.
pub fn write_private(path: &Path, text: &str) {
    fs::write(path, text).expect("write file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => found.extend(files_under(&path)),
            Ok(kind) if kind.is_file() => found.push(path),
            _ => {}
        }
    }
    found
}

/// Panics if any file under `dir` holds the base64 key `key_b64`, its raw bytes or its hex form.
pub fn assert_key_not_stored(dir: &Path, key_b64: &str) {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .unwrap_or_else(|e| panic!("{key_b64:?} is not base64: {e}"));
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    for file in files_under(dir) {
        let bytes = fs::read(&file).unwrap_or_default();
        for (form, needle) in [("base64", key_b64.as_bytes()), ("raw", &raw[..]), ("hex", hex.as_bytes())] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds the private key ({form})",
                file.display()
            );
        }
    }
}
