//! Issue 8, point 4: the QR code `meshctl device add --qr` prints scans where people print it, in an
//! 80-column terminal, for long endpoints (a 63-character dynamic-DNS name, a full IPv6 literal) and a
//! long domain; a config that cannot fit is refused in one line that points at `--qr-png`/`--qr-svg`,
//! and nothing changes.
//!
//! The terminal is simulated faithfully: the printed text (ANSI colours and half blocks) is laid out on
//! an 80-column screen, wrapping any longer line as a terminal does, on a dark and on a light theme;
//! the screen becomes an image and zbar (`zbarimg`), a real decoder, reads it.

use std::fs;
use std::path::Path;
use std::process::Command;

use meshd_e2e::{describe, meshctl, output, product_bin, run_json, run_ok};

const COLUMNS: usize = 80;
/// Pixels per module in the screen image: a cell is one module wide and two high (half blocks).
const SCALE: usize = 4;

/// One screen cell: top and bottom half dark (`true`) or light.
type Cell = (bool, bool);

/// Lay the printed text out on an `COLUMNS`-wide screen as a terminal would: each line from the left,
/// wrapped at the last column. Cells nothing was drawn on stay `None` (the theme's background).
fn screen(printed: &str) -> Vec<Vec<Option<Cell>>> {
    let (mut fg, mut bg) = (None::<bool>, None::<bool>);
    let mut rows = Vec::new();
    for line in printed.lines() {
        let mut row: Vec<Option<Cell>> = Vec::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\x1b' => {
                    assert_eq!(chars.next(), Some('['), "an escape that is not SGR");
                    let params: String = chars.by_ref().take_while(|&c| c != 'm').collect();
                    let numbers: Vec<&str> = params.split(';').collect();
                    match numbers.as_slice() {
                        ["0"] | [""] => (fg, bg) = (None, None),
                        ["38", "5", f, "48", "5", b] => (fg, bg) = (Some(*f == "16"), Some(*b == "16")),
                        other => panic!("unexpected SGR {other:?}"),
                    }
                }
                '\u{2580}' => {
                    if row.len() == COLUMNS {
                        rows.push(std::mem::take(&mut row));
                    }
                    row.push(Some((fg.expect("colour set"), bg.expect("colour set"))));
                }
                other => panic!("unexpected character {other:?} in the QR output"),
            }
        }
        rows.push(row);
    }
    rows
}

/// zbar's reading of the screen on a theme whose background is `dark` or light; `None` when it finds
/// no code.
fn scan(rows: &[Vec<Option<Cell>>], dark_theme: bool, dir: &Path) -> Option<Vec<u8>> {
    // A margin of background around the screen, as around a terminal window's text area.
    let margin = 4;
    let (width, height) = ((COLUMNS + 2 * margin) * SCALE, (rows.len() * 2 + 2 * margin) * SCALE);
    let background = if dark_theme { 0u8 } else { 255 };
    let mut pixels = vec![background; width * height];
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let Some((top, bottom)) = cell else { continue };
            for (half, dark) in [(0, top), (1, bottom)] {
                let shade = if *dark { 0 } else { 255 };
                for dy in 0..SCALE {
                    let y = ((margin + r * 2 + half) * SCALE) + dy;
                    let x0 = (margin + c) * SCALE;
                    pixels[y * width + x0..y * width + x0 + SCALE].fill(shade);
                }
            }
        }
    }
    let image = dir.join(if dark_theme { "dark.pgm" } else { "light.pgm" });
    let mut pgm = format!("P5\n{width} {height}\n255\n").into_bytes();
    pgm.extend_from_slice(&pixels);
    fs::write(&image, pgm).unwrap();
    let out = output(Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(&image));
    out.status.success().then_some(out.stdout)
}

/// The config with the optional spaces gone, for comparing the wg-quick file with the code's text.
fn squeezed(text: &str) -> String {
    text.replace(' ', "")
}

/// A network with `endpoint` and `domain`; a phone added with `--qr` and `--conf`. Returns the printed
/// output and the config file's text.
fn phone_qr(endpoint: &str, domain: &str, dir: &Path) -> (String, String) {
    let state = dir.join("state");
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", endpoint, "--domain", domain]);
    run_ok(init.arg("--state-dir").arg(&state));
    run_ok(meshctl(&state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    let conf = dir.join("phone.conf");
    let printed =
        run_ok(meshctl(&state).args(["device", "add", "phone", "--allow", "wallet", "--qr", "--conf"]).arg(&conf));
    (printed, fs::read_to_string(conf).unwrap())
}

#[test]
fn the_terminal_qr_scans_at_80_columns_with_long_endpoints_and_domains() {
    let long_name = format!("{}.example", "n".repeat(55));
    assert_eq!(long_name.len(), 63);
    let cases = [
        (format!("{long_name}:51820"), "home.internal".to_owned()),
        ("[2001:db8:1234:5678:9abc:def0:1234:5678]:65535".to_owned(), "home.internal".to_owned()),
        ("[2001:db8:1234:5678:9abc:def0:1234:5678]:65535".to_owned(), "home.smith-family-node.example".to_owned()),
        (format!("{long_name}:51820"), "home.smith-family.example".to_owned()),
    ];
    for (endpoint, domain) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (printed, conf) = phone_qr(&endpoint, &domain, tmp.path());
        let rows = screen(&printed);
        let widest = rows.iter().map(Vec::len).max().unwrap();
        assert!(widest <= COLUMNS, "{endpoint} / {domain}: {widest} columns");
        for dark_theme in [true, false] {
            let decoded = scan(&rows, dark_theme, tmp.path());
            let decoded =
                decoded.unwrap_or_else(|| panic!("{endpoint} / {domain}: zbar reads nothing (dark: {dark_theme})"));
            let text = String::from_utf8(decoded).unwrap();
            assert_eq!(squeezed(&text), squeezed(&conf), "{endpoint} / {domain}: the code is not the config");
        }
    }
}

/// A network in `dir` whose device configs cannot fit an 80-column QR code (a 125-character domain),
/// with a service `wallet`; returns its state directory and domain.
fn network_too_long_for_the_terminal(dir: &Path) -> (std::path::PathBuf, String) {
    let state = dir.join("state");
    let domain = format!("{}.{}.example", "a".repeat(60), "b".repeat(60));
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "[2001:db8::1]:51820", "--domain", &domain]);
    run_ok(init.arg("--state-dir").arg(&state));
    run_ok(meshctl(&state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    (state, domain)
}

#[test]
fn a_config_too_long_for_the_terminal_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, domain) = network_too_long_for_the_terminal(tmp.path());
    let out = output(meshctl(&state).args(["device", "add", "phone", "--allow", "wallet", "--qr"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("80-column") && stderr.contains("--qr-png"), "{stderr}");
    assert!(out.stdout.is_empty(), "printed something: {}", describe(&out));
    let devices = run_json(meshctl(&state).args(["device", "list", "--json"]));
    assert_eq!(devices, serde_json::json!([]), "the refused device was registered");
    // The way out the message names works.
    let png = tmp.path().join("phone.png");
    run_ok(meshctl(&state).args(["device", "add", "phone", "--allow", "wallet", "--qr-png"]).arg(&png));
    let out = output(Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(&png));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&domain), "{}", describe(&out));
}

/// Every output is made before any is written: with `--conf -` and a `--qr` that cannot fit, the
/// config (private key included) is not printed before the refusal.
#[test]
fn no_output_gets_the_config_when_another_cannot_be_made() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, _) = network_too_long_for_the_terminal(tmp.path());
    let out = output(meshctl(&state).args(["device", "add", "phone", "--allow", "wallet", "--conf", "-", "--qr"]));
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "the config went out before the refusal: {}", describe(&out));
    assert_eq!(run_json(meshctl(&state).args(["device", "list", "--json"])), serde_json::json!([]));
}
