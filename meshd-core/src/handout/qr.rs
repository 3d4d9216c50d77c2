//! QR codes of a device's wg-quick text (ISO/IEC 18004), for the WireGuard app's "scan from QR code":
//! in a terminal (Unicode half blocks, explicit colours, at most 80 columns), as a PNG and as an SVG.

use std::io::Cursor;

use image::{ImageFormat, Luma};
use qrcode::bits::Bits;
use qrcode::types::QrError;
use qrcode::{EcLevel, QrCode, Version};

use super::RenderError;

/// Light margin around a code, in modules: the width the QR specification asks for.
const QUIET_ZONE: usize = 4;
/// Pixels per module in the PNG: scanners need at least 4, 8 leaves room for a shaky camera.
const PNG_MODULE_PX: u32 = 8;
/// User units per module in the SVG, so that it shows at a usable size when no width is set.
const SVG_MODULE_UNITS: u32 = 8;
/// xterm-256 palette entries for pure black and white: themes recolour the 16 basic ANSI colours
/// (a dark theme's "white" may be grey, its "black" the background), but not these.
const ANSI_DARK: u8 = 16;
/// See [`ANSI_DARK`].
const ANSI_LIGHT: u8 = 231;
/// Upper half block: the foreground paints the top module, the background the bottom one.
const HALF_BLOCK: char = '\u{2580}';
/// SGR 0: back to the terminal's own colours.
const ANSI_RESET: &str = "\x1b[0m";

/// The smallest code holding `text` as one byte-mode segment. qrcode's own mixed segmentation
/// sometimes takes a version more for config text (4 more columns), pushing a terminal code past 80.
fn encode(text: &str, level: EcLevel) -> Result<QrCode, RenderError> {
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        match bits.push_byte_data(text.as_bytes()).and_then(|()| bits.push_terminator(level)) {
            Ok(()) => return QrCode::with_bits(bits, level).map_err(RenderError::Qr),
            Err(QrError::DataTooLong) => {}
            Err(other) => return Err(RenderError::Qr(other)),
        }
    }
    Err(RenderError::TooLongForQr { len: text.len() })
}

/// The width of the terminal a `--qr` code must fit, in columns: the classic terminal, and what a
/// wrapped code (unreadable) would be cut at.
pub const TERMINAL_COLUMNS: usize = 80;

/// The narrowest quiet zone the terminal code falls back to, in modules, when the standard one (4,
/// ISO/IEC 18004 section 6.3.8) would make it wider than the terminal. Phone scanners and zbar read
/// codes with 2; the zone is drawn light, so a dark theme's background never touches the code.
const MIN_TERMINAL_QUIET_ZONE: usize = 2;

/// wg-quick text without its optional spaces (`Key=a,b` for `Key = a, b`): what the terminal QR code
/// carries, to fit more config into 80 columns. wg-quick and the WireGuard apps read both forms alike
/// (a key, `=`, a value; list items trimmed). For text from
/// [`DeviceConfig::to_wg_quick`](super::DeviceConfig::to_wg_quick), whose values hold no spaces or
/// commas ([`DeviceConfig::validate`](super::DeviceConfig::validate)).
pub fn compact_wg_quick(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.split_once('=') {
            Some((key, value)) => {
                out.push_str(key.trim());
                out.push('=');
                let items: Vec<&str> = value.split(',').map(str::trim).collect();
                out.push_str(&items.join(","));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// QR for a terminal: Unicode half blocks with explicit ANSI colours, dark modules on a light field
/// with a quiet zone, so that it scans on dark and light themes alike (zbar cannot read inverted codes).
/// The code carries [`compact_wg_quick`] of `text` and is at most [`TERMINAL_COLUMNS`] wide: the quiet
/// zone narrows from 4 to 2 modules when that makes it fit. Errors: [`RenderError::TooWideForTerminal`]
/// when even that is too wide (a long endpoint name and a long domain together), with the way out.
pub fn qr_terminal(text: &str) -> Result<String, RenderError> {
    // EC level L, as `qrencode -t ansiutf8` uses: the lowest level holds the most config in 80
    // columns, and a wrapped line makes the code unreadable. A screen is not smudged.
    let code = encode(&compact_wg_quick(text), EcLevel::L)?;
    let width = code.width();
    let zone = (MIN_TERMINAL_QUIET_ZONE..=QUIET_ZONE)
        .rev()
        .find(|zone| width + 2 * zone <= TERMINAL_COLUMNS)
        .ok_or(RenderError::TooWideForTerminal { columns: width + 2 * QUIET_ZONE })?;
    let modules = code.to_colors();
    let side = width + 2 * zone;
    // Coordinates include the quiet zone; everything outside the code is light.
    let dark = |x: usize, y: usize| {
        let (Some(x), Some(y)) = (x.checked_sub(zone), y.checked_sub(zone)) else {
            return false;
        };
        x < width && y < width && modules[y * width + x] == qrcode::Color::Dark
    };
    let mut out = String::new();
    for y in (0..side).step_by(2) {
        let mut pen = None;
        for x in 0..side {
            let cell = (dark(x, y), dark(x, y + 1));
            // Emit colours only where they change, to keep the text short.
            if pen != Some(cell) {
                out.push_str(&format!("\x1b[38;5;{};48;5;{}m", ansi_colour(cell.0), ansi_colour(cell.1)));
                pen = Some(cell);
            }
            out.push(HALF_BLOCK);
        }
        // Reset before the line break, or some terminals paint the rest of the line.
        out.push_str(ANSI_RESET);
        out.push('\n');
    }
    Ok(out)
}

fn ansi_colour(dark: bool) -> u8 {
    if dark { ANSI_DARK } else { ANSI_LIGHT }
}

/// PNG bytes, EC level M, 8 px per module, quiet zone on: scans in the WireGuard app and with zbarimg.
pub fn qr_png(text: &str) -> Result<Vec<u8>, RenderError> {
    let image = encode(text, EcLevel::M)?
        .render::<Luma<u8>>()
        .quiet_zone(true)
        .module_dimensions(PNG_MODULE_PX, PNG_MODULE_PX)
        .build();
    let mut png = Vec::new();
    image.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)?;
    Ok(png)
}

/// SVG document of the same code (EC M, quiet zone, dark on white), 8 user units per module.
pub fn qr_svg(text: &str) -> Result<String, RenderError> {
    use qrcode::render::svg::Color;
    Ok(encode(text, EcLevel::M)?
        .render::<Color>()
        .quiet_zone(true)
        .module_dimensions(SVG_MODULE_UNITS, SVG_MODULE_UNITS)
        .dark_color(Color("#000000"))
        .light_color(Color("#ffffff"))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handout::tests::{net, sample};
    use crate::handout::{DeviceConfig, RenderError};

    /// Decode the one QR code in a bitmap with rqrr, returning its raw bytes.
    fn scan(width: usize, height: usize, dark: impl Fn(usize, usize) -> bool) -> Vec<u8> {
        let mut image = rqrr::PreparedImage::prepare_from_bitmap(width, height, dark);
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1, "expected exactly one QR code");
        let mut bytes = Vec::new();
        grids[0].decode_to(&mut bytes).expect("QR code decodes");
        bytes
    }

    #[test]
    fn qr_png_decodes_byte_exact() {
        let text = sample().to_wg_quick();
        assert!(text.len() > 350, "a realistic config, {} bytes", text.len());
        let png = qr_png(&text).unwrap();
        let image = image::load_from_memory_with_format(&png, ImageFormat::Png).unwrap().to_luma8();
        let modules = encode(&text, EcLevel::M).unwrap().width() as u32;
        let side = (modules + 2 * QUIET_ZONE as u32) * PNG_MODULE_PX;
        assert_eq!(image.dimensions(), (side, side));
        let decoded = scan(side as usize, side as usize, |x, y| image.get_pixel(x as u32, y as u32).0[0] < 128);
        assert_eq!(decoded, text.as_bytes());
    }

    #[test]
    fn qr_png_with_zbarimg() {
        let text = sample().to_wg_quick();
        let png = qr_png(&text).unwrap();
        let file = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
        std::fs::write(file.path(), &png).unwrap();
        // -Sbinary keeps zbar from appending a newline or re-encoding the bytes.
        let output = std::process::Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(file.path()).output();
        let output = match output {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(std::env::var_os("CI").is_none(), "zbarimg is missing in CI: install zbar-tools");
                eprintln!("note: zbarimg not installed, skipping the zbar scan");
                return;
            }
            other => other.unwrap(),
        };
        assert!(output.status.success(), "zbarimg failed: {output:?}");
        assert_eq!(output.stdout, text.as_bytes());
    }

    #[test]
    fn qr_svg_is_a_well_formed_scannable_document() {
        let text = sample().to_wg_quick();
        let svg = qr_svg(&text).unwrap();
        assert!(svg.starts_with("<?xml") && svg.ends_with("</svg>"));
        assert_balanced_xml(&svg);

        let code = encode(&text, EcLevel::M).unwrap();
        let side = (code.width() + 2 * QUIET_ZONE) * SVG_MODULE_UNITS as usize;
        let root = element(&svg, "svg");
        assert_eq!(attribute(root, "width"), side.to_string());
        assert_eq!(attribute(root, "height"), side.to_string());
        assert_eq!(attribute(root, "viewBox"), format!("0 0 {side} {side}"));
        let background = element(&svg, "rect");
        assert_eq!(attribute(background, "fill"), "#ffffff");
        assert_eq!(attribute(background, "width"), side.to_string());
        let path = element(&svg, "path");
        assert_eq!(attribute(path, "fill"), "#000000");

        // Paint the path's rectangles and scan the result: one rectangle per dark module.
        let rects = path_rects(attribute(path, "d"));
        let dark_modules = code.to_colors().iter().filter(|&&c| c == qrcode::Color::Dark).count();
        assert_eq!(rects.len(), dark_modules);
        let mut bitmap = vec![false; side * side];
        let margin = QUIET_ZONE * SVG_MODULE_UNITS as usize;
        for (left, top, width, height) in rects {
            assert!(left >= margin && top >= margin, "dark module in the quiet zone");
            assert!(left + width <= side - margin && top + height <= side - margin);
            for y in top..top + height {
                bitmap[y * side + left..y * side + left + width].fill(true);
            }
        }
        let decoded = scan(side, side, |x, y| bitmap[y * side + x]);
        assert_eq!(decoded, text.as_bytes());
    }

    /// Every tag closes in order and there is a single root element.
    fn assert_balanced_xml(doc: &str) {
        let mut open: Vec<&str> = Vec::new();
        let mut roots = 0;
        for tag in doc.split('<').skip(1) {
            let tag = tag.split('>').next().unwrap();
            if tag.starts_with('?') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name.trim()), "mismatched </{name}>");
                continue;
            }
            if open.is_empty() {
                roots += 1;
            }
            if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap());
            }
        }
        assert!(open.is_empty(), "unclosed elements: {open:?}");
        assert_eq!(roots, 1);
    }

    /// The text of the first `<name ...>` start tag.
    fn element<'a>(doc: &'a str, name: &str) -> &'a str {
        let start = doc.find(&format!("<{name} ")).expect(name);
        let rest = &doc[start..];
        &rest[..rest.find('>').unwrap()]
    }

    fn attribute<'a>(tag: &'a str, name: &str) -> &'a str {
        let start = tag.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
        let rest = &tag[start..];
        &rest[..rest.find('"').unwrap()]
    }

    /// Parse the `M{l} {t}h{w}v{h}H{l}V{t}` subpaths qrcode writes into (left, top, width, height).
    fn path_rects(d: &str) -> Vec<(usize, usize, usize, usize)> {
        d.split('M')
            .skip(1)
            .map(|sub| {
                let numbers: Vec<usize> =
                    sub.split(|c: char| " hvHV".contains(c)).map(|n| n.parse().unwrap()).collect();
                let [left, top, width, height, left2, top2] = numbers[..] else {
                    panic!("unexpected subpath M{sub}");
                };
                assert_eq!((left, top), (left2, top2), "subpath M{sub} does not close");
                (left, top, width, height)
            })
            .collect()
    }

    /// The colour codes `qr_terminal` writes; anything else fails the test, because a
    /// theme-dependent default colour is exactly what must not appear.
    fn ansi_is_dark(code: Option<u8>) -> bool {
        match code {
            Some(ANSI_DARK) => true,
            Some(ANSI_LIGHT) => false,
            other => panic!("cell drawn in a theme-dependent colour: {other:?}"),
        }
    }

    /// Turn terminal output back into rows of pixels, two per character cell (top, bottom).
    fn terminal_pixels(out: &str) -> Vec<Vec<bool>> {
        let (mut fg, mut bg) = (None, None);
        let mut rows: Vec<Vec<bool>> = Vec::new();
        for line in out.lines() {
            let (mut top, mut bottom) = (Vec::new(), Vec::new());
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\x1b' => {
                        assert_eq!(chars.next(), Some('['));
                        let params: String = chars.by_ref().take_while(|&c| c != 'm').collect();
                        let params: Vec<&str> = params.split(';').collect();
                        let mut params = params.as_slice();
                        while let Some((first, rest)) = params.split_first() {
                            params = match (*first, rest) {
                                ("0" | "", rest) => {
                                    (fg, bg) = (None, None);
                                    rest
                                }
                                ("38", ["5", n, rest @ ..]) => {
                                    fg = Some(n.parse::<u8>().unwrap());
                                    rest
                                }
                                ("48", ["5", n, rest @ ..]) => {
                                    bg = Some(n.parse::<u8>().unwrap());
                                    rest
                                }
                                _ => panic!("unexpected SGR parameters {params:?}"),
                            };
                        }
                    }
                    HALF_BLOCK => {
                        top.push(ansi_is_dark(fg));
                        bottom.push(ansi_is_dark(bg));
                    }
                    other => panic!("unexpected character {other:?}"),
                }
            }
            assert_eq!((fg, bg), (None, None), "line does not end with a reset");
            rows.extend([top, bottom]);
        }
        rows
    }

    #[test]
    fn qr_terminal_scans_with_explicit_colours() {
        let text = sample().to_wg_quick();
        let out = qr_terminal(&text).unwrap();
        assert!(out.ends_with('\n'));
        let pixels = terminal_pixels(&out);
        let width = pixels[0].len();
        assert!(pixels.iter().all(|row| row.len() == width));
        // It must fit an 80-column terminal, or wrapping destroys it.
        assert!(width <= TERMINAL_COLUMNS, "{width} columns");
        // Light quiet zone on every side: dark modules on a light field.
        let zone = QUIET_ZONE;
        for (y, row) in pixels.iter().enumerate() {
            let in_zone = y < zone || y >= pixels.len() - zone;
            assert!(row[..zone].iter().chain(&row[width - zone..]).all(|&d| !d));
            assert!(!in_zone || row.iter().all(|&d| !d), "row {y} in the quiet zone");
        }
        // Cells are about twice as tall as wide, so one pixel per half cell is square; scale up
        // so that rqrr sees modules of several pixels as a camera would.
        const SCALE: usize = 4;
        let decoded = scan(width * SCALE, pixels.len() * SCALE, |x, y| pixels[y / SCALE][x / SCALE]);
        assert_eq!(decoded, compact_wg_quick(&text).as_bytes());
        assert_eq!(DeviceConfig::parse(&String::from_utf8(decoded).unwrap()).unwrap(), sample());
    }

    #[test]
    fn the_compact_form_reads_back_as_the_same_config() {
        let text = sample().to_wg_quick();
        let compact = compact_wg_quick(&text);
        assert!(compact.len() < text.len());
        assert!(compact.contains("\nAddress=") && !compact.contains(" = ") && !compact.contains(", "));
        assert_eq!(DeviceConfig::parse(&compact).unwrap(), sample());
    }

    /// A device config as long as a /16 network makes one: the last address of the range, a random ULA
    /// prefix with no zero to drop, a 63-character endpoint name, and a domain of `domain_len` characters.
    fn longest_config(domain_len: usize) -> DeviceConfig {
        let mut config = sample();
        config.addresses = vec![net("10.77.255.254/32"), net("fdff:ffff:ffff::fffe/128")];
        config.dns_servers = vec!["10.77.0.1".parse().unwrap(), "fdff:ffff:ffff::1".parse().unwrap()];
        config.dns_search = vec![format!("{}.internal", "d".repeat(domain_len - ".internal".len()))];
        config.peer.endpoint = format!("{}.example:51820", "n".repeat(55));
        config.peer.allowed_ips = vec![net("10.77.0.0/16"), net("fdff:ffff:ffff::/48")];
        config
    }

    #[test]
    fn the_terminal_qr_fits_80_columns_for_the_longest_configs_the_docs_promise() {
        // docs/CLI.md: a 63-character endpoint name with a domain of up to 24 characters, any device.
        let fits = qr_terminal(&longest_config(24).to_wg_quick()).unwrap();
        assert!(terminal_pixels(&fits)[0].len() <= TERMINAL_COLUMNS);
        assert!(matches!(qr_terminal(&longest_config(40).to_wg_quick()), Err(RenderError::TooWideForTerminal { .. })));
    }

    #[test]
    fn a_config_too_wide_for_the_terminal_says_how_to_get_it() {
        let mut config = sample();
        config.dns_search = vec![format!("{}.{}.internal", "d".repeat(63), "e".repeat(63))];
        let err = qr_terminal(&config.to_wg_quick()).unwrap_err();
        assert!(matches!(err, RenderError::TooWideForTerminal { columns } if columns > TERMINAL_COLUMNS));
        assert!(err.to_string().contains("--qr-png"), "{err}");
        // The same config still goes into a PNG.
        assert!(qr_png(&config.to_wg_quick()).is_ok());
    }

    #[test]
    fn too_long_text_is_refused() {
        let text = "x".repeat(3000);
        let err = qr_png(&text).unwrap_err();
        assert!(matches!(err, RenderError::TooLongForQr { len: 3000 }));
        assert_eq!(err.to_string(), "config too long for a QR code (3000 bytes)");
        assert!(matches!(qr_svg(&text), Err(RenderError::TooLongForQr { .. })));
        assert!(matches!(qr_terminal(&text), Err(RenderError::TooLongForQr { .. })));
    }
}
