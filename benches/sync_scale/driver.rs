//! The driver: runs one controller process per host count and prints the tables.

use super::*;

pub(crate) fn driver(args: &[String]) -> Result<()> {
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--hosts" | "--changes" => {
                rest.next();
            }
            "--no-reference" => {}
            _ => return Err(format!("unknown argument {arg:?} (see the header of benches/sync_scale/main.rs)").into()),
        }
    }
    let hosts: Vec<usize> = match flag(args, "--hosts") {
        Some(list) => list
            .split(',')
            .map(|n| n.trim().replace('_', "").parse::<usize>().map_err(|e| format!("--hosts {n:?}: {e}")))
            .collect::<std::result::Result<_, _>>()?,
        None => DEFAULT_HOSTS.to_vec(),
    };
    let changes = number(args, "--changes", DEFAULT_CHANGES)?;
    let reference = !args.iter().any(|a| a == "--no-reference");
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for n in hosts {
        eprintln!("sync_scale: {n} hosts, {changes} changes");
        let mut command = Command::new(&exe);
        command.args(["controller", "--hosts", &n.to_string(), "--changes", &changes.to_string()]);
        if !reference {
            command.arg("--no-reference");
        }
        let out = command.stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            return Err(format!("the controller for {n} hosts failed ({})", out.status).into());
        }
        rows.push(serde_json::from_slice::<Value>(&out.stdout)?);
    }
    print_tables(&rows, changes, reference);
    Ok(())
}

pub(crate) fn print_tables(rows: &[Value], changes: usize, reference: bool) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("Machine: {cores} cores ({cpu}), kernel {}; {changes} changes per host count.", kernel.trim());

    println!("\nDelivery of one change (median and max of {changes}), from the call of `publish()`:\n");
    header(&[
        "hosts",
        "to all, median (ms)",
        "to all, max (ms)",
        "to the first, median (ms)",
        "publish() CPU, median (ms)",
        "controller process CPU per change, median (ms)",
        "client process CPU per change, median (ms)",
        "controller RSS: no clients / connected / peak (MB)",
    ]);
    for r in rows {
        let rss = format!("{:.1} / {:.1} / {:.1}", mb(&r["rss_idle_kb"]), mb(&r["rss_connected_kb"]), mb(&r["hwm_kb"]));
        row(&[
            r["hosts"].to_string(),
            format!("{:.1}", median(&r["deliver_ms"])),
            format!("{:.1}", max(&r["deliver_ms"])),
            format!("{:.2}", median(&r["first_ms"])),
            format!("{:.2}", median(&r["publish_cpu_ms"])),
            format!("{:.1}", median(&r["process_cpu_ms"])),
            format!("{:.1}", median(&r["client_cpu_ms"])),
            rss,
        ]);
    }

    println!("\nWhere `publish()`'s time goes (each part timed alone, median of {REPEATS}), and setup:\n");
    header(&[
        "hosts",
        "publish() wall, median (ms)",
        "digest() (ms)",
        "changes() (ms)",
        "state.clone() by the caller (ms)",
        "RSS per connected member (KB)",
        "N members connect and subscribe (ms)",
        "listen queue overflows while connecting",
        "TCP retransmits during the changes",
    ]);
    for r in rows {
        row(&[
            r["hosts"].to_string(),
            format!("{:.2}", median(&r["publish_wall_ms"])),
            format!("{:.2}", f(&r["digest_ms"])),
            format!("{:.2}", f(&r["changes_ms"])),
            format!("{:.2}", f(&r["clone_ms"])),
            format!("{:.1}", (f(&r["rss_connected_kb"]) - f(&r["rss_idle_kb"])) / f(&r["hosts"])),
            format!("{:.0}", f(&r["connect_ms"])),
            r["connect_listen_overflows"].to_string(),
            r["changes_retransmits"].to_string(),
        ]);
    }

    println!("\nSizes, and the whole state instead of the changes:\n");
    let mut columns = vec![
        "hosts",
        "state JSON (KB)",
        "Changes line, median (bytes)",
        "sent per change to all members (KB)",
        "whole state to all members at once (ms)",
        "controller CPU for it (ms)",
        "controller peak RSS after it (MB)",
        "TCP retransmits during it",
    ];
    if reference {
        columns.extend(["serialise the whole state once (ms)", "serialise it once per member, N times (ms)"]);
    }
    header(&columns);
    for r in rows {
        let line = median(&r["change_line_bytes"]);
        let mut cells = vec![
            r["hosts"].to_string(),
            format!("{:.0}", f(&r["state_bytes"]) / 1024.0),
            format!("{line:.0}"),
            format!("{:.0}", line * f(&r["hosts"]) / 1024.0),
            format!("{:.0}", f(&r["resync_ms"])),
            format!("{:.0}", f(&r["resync_cpu_ms"])),
            format!("{:.1}", mb(&r["hwm_resync_kb"])),
            r["resync_retransmits"].to_string(),
        ];
        if reference {
            cells.extend([format!("{:.2}", f(&r["serialise_once_ms"])), format!("{:.0}", f(&r["serialise_each_ms"]))]);
        }
        row(&cells);
    }
}

/// A markdown table's header: the first column left-aligned, the others (figures) right-aligned.
pub(crate) fn header(columns: &[&str]) {
    println!("| {} |", columns.join(" | "));
    println!("|------|{}", "-----:|".repeat(columns.len() - 1));
}

pub(crate) fn row(cells: &[String]) {
    println!("| {} |", cells.join(" | "));
}

pub(crate) fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

pub(crate) fn mb(kb: &Value) -> f64 {
    f(kb) / 1024.0
}

pub(crate) fn figures(values: &Value) -> Vec<f64> {
    values.as_array().map(|a| a.iter().map(f).collect()).unwrap_or_default()
}

pub(crate) fn median(values: &Value) -> f64 {
    median_of(figures(values))
}

pub(crate) fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn max(values: &Value) -> f64 {
    figures(values).into_iter().reduce(f64::max).unwrap_or(f64::NAN)
}
