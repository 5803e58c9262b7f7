//! kcache-bench: measures a kcache mount against a native directory (and the reference
//! FUSE file systems bindfs and libfuse's passthrough_hp, when available) in the same run on
//! the same disk, and prints kcache/native ratios.
//!
//! Ratio = native_time / other_time, so 1.0 means "as fast as native" and higher is
//! better; a few rows compare with another baseline instead (a kcache mount without a
//! quota, curl), and say so, and a few have goals in seconds. Missed goals are reported,
//! not treated as errors: the exit status is non-zero only when something actually failed.

mod mounts;
mod own_stores;
mod remote;
mod requests;
mod tar_x;
mod workloads;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;

use mounts::{Mount, RunDir};
use workloads::{Amount, Phase, Sizes, Workload};

#[derive(Parser, Debug)]
#[command(
    name = "kcache-bench",
    about = "Compare a kcache mount with a native directory (and bindfs, passthrough_hp) on \
             the same disk"
)]
struct Args {
    /// kcache binary [default: `kcache` in the same directory as this program]
    #[arg(long, value_name = "PATH")]
    kcache: Option<PathBuf>,

    /// Base directory for scratch data; it must be on the disk you want to measure
    #[arg(long, value_name = "BASE", default_value = "target/bench-tmp")]
    dir: PathBuf,

    /// Small sizes (64 MiB, 2,000 files; remote workloads 256 MiB, 1 GiB, 10,000 files) for
    /// a smoke run
    #[arg(long)]
    quick: bool,

    /// Run only this workload (repeatable)
    #[arg(long, value_name = "NAME", value_enum)]
    only: Vec<Workload>,

    /// Skip the bindfs column even if bindfs is installed
    #[arg(long)]
    no_bindfs: bool,

    /// libfuse's reference file system `passthrough_hp` (built from libfuse's examples), to
    /// run the target workloads on as one more column [default: $KCACHE_BENCH_PASSTHROUGH_HP]
    #[arg(long, value_name = "PATH")]
    passthrough_hp: Option<PathBuf>,

    /// Passes of each target workload (native, kcache, bindfs, passthrough_hp, native,
    /// kcache, ...): the table shows each phase's median, since this kind of VM is noisy
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    passes: u32,

    /// FUSE transport of the kcache mounts: io-uring or classic (-o io_uring / -o
    /// noio_uring); default: what kcache picks (io_uring when the kernel allows it)
    #[arg(long, value_name = "NAME", value_enum)]
    transport: Option<BenchTransport>,

    /// Seconds that must have passed since the last run under BASE deleted its files
    /// before this one starts (it waits the rest): file creation on ext4 stays slow for
    /// minutes after a mass delete. 0 skips the wait [default: 360, 0 with --quick]
    #[arg(long, value_name = "SECS")]
    settle: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchTransport {
    IoUring,
    Classic,
}

/// One directory the workloads run in.
struct Target<'a> {
    name: &'static str,
    root: &'a Path,
}

/// A FUSE file system that stores nothing of its own, measured beside kcache as a
/// yardstick for what any FUSE file system costs here: one table column each, "n/a" when
/// it is not used.
struct Reference {
    name: &'static str,
    mount: Option<Mount>,
}

/// Width of the target column in the progress lines (the longest target name).
const TARGET_WIDTH: usize = 14;

/// Results of one phase across targets, i.e. one table row.
struct Row {
    /// Who ran the phase in the `native` column ("native" except for rows that compare
    /// kcache with kcache or with a tool) and its result; `None` for rows judged by time.
    native: Option<(&'static str, Phase)>,
    kcache: Option<Phase>,
    /// The reference targets' results, by name.
    references: Vec<(&'static str, Phase)>,
}

impl Row {
    fn label(&self) -> &str {
        self.native
            .as_ref()
            .map(|(_, p)| p)
            .or(self.kcache.as_ref())
            .map_or("?", |p| p.label.as_str())
    }
}

fn main() {
    let args = Args::parse();
    workloads::install_signal_handlers();
    if let Err(e) = run(&args) {
        eprintln!("kcache-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let kcache_bin = resolve_kcache(args.kcache.as_deref())?;
    let bindfs = if args.no_bindfs {
        None
    } else {
        find_in_path("bindfs")
    };
    let passthrough_hp = resolve_passthrough_hp(args.passthrough_hp.as_deref())?;
    let enable_uring = fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "absent".into());
    // The reference runs on the transport kcache is asked for (or picks by default), so
    // the columns compare like with like.
    let passthrough_hp_uring =
        enable_uring == "Y" && args.transport != Some(BenchTransport::Classic);
    let selected: Vec<Workload> = if args.only.is_empty() {
        Workload::ALL.to_vec()
    } else {
        Workload::ALL
            .into_iter()
            .filter(|w| args.only.contains(w))
            .collect()
    };
    let sizes = Sizes::new(args.quick);
    Mount::set_transport_option(args.transport.map(|t| match t {
        BenchTransport::IoUring => "io_uring",
        BenchTransport::Classic => "noio_uring",
    }));

    // Declared before the mounts so it is dropped (and deleted) after they unmount.
    let run_dir = RunDir::create(&args.dir)?;
    let settle = args.settle.unwrap_or(if args.quick { 0 } else { 360 });
    println!("kcache-bench");
    println!(
        "  mode:    {} (big file {}, {} small files x 4 KiB in 256 dirs)",
        if args.quick { "quick" } else { "full" },
        workloads::human_size(sizes.big_file),
        sizes.small_files
    );
    println!(
        "  scratch: {} ({})",
        run_dir.path().display(),
        fs_type(run_dir.path())
    );
    println!("  kcache:  {}", kcache_bin.display());
    println!(
        "  fuse:    {} (enable_uring={})",
        match args.transport {
            Some(BenchTransport::IoUring) => "io_uring (-o io_uring)",
            Some(BenchTransport::Classic) => "classic (-o noio_uring)",
            None => "kcache's choice",
        },
        enable_uring
    );
    match &bindfs {
        Some(p) => println!("  bindfs:  {}", p.display()),
        None => println!("  bindfs:  not used (not on PATH or --no-bindfs)"),
    }
    match &passthrough_hp {
        Some(p) => println!(
            "  passthrough_hp: {} ({})",
            p.display(),
            if passthrough_hp_uring {
                "io_uring"
            } else {
                "classic"
            }
        ),
        None => println!(
            "  passthrough_hp: not used (no --passthrough-hp or KCACHE_BENCH_PASSTHROUGH_HP)"
        ),
    }
    if let Some(base) = run_dir.path().parent() {
        mounts::settle_after_last_cleanup(base, settle);
    }
    println!();

    let native_dir = run_dir.subdir("native")?;
    let store_dir = run_dir.subdir("kcache-store")?;
    let kcache_mnt = run_dir.subdir("kcache-mnt")?;
    // Its metrics give the FUSE requests each phase cost per file.
    let probe = requests::Probe::on_free_port()?;
    let mut kcache = Mount::kcache(
        &kcache_bin,
        &store_dir,
        &kcache_mnt,
        &run_dir.path().join("kcache.log"),
        None,
        Some(probe.addr()),
    )
    .context("mounting kcache")?;
    let mut references = vec![
        Reference {
            name: "bindfs",
            mount: bindfs
                .map(|_| mount_reference(&run_dir, "bindfs", Mount::bindfs))
                .transpose()?,
        },
        Reference {
            name: "passthrough_hp",
            mount: passthrough_hp
                .map(|bin| {
                    mount_reference(&run_dir, "passthrough_hp", |src, mnt, log| {
                        Mount::passthrough_hp(&bin, src, mnt, log, passthrough_hp_uring)
                    })
                })
                .transpose()?,
        },
    ];

    let mut targets = vec![
        Target {
            name: "native",
            root: &native_dir,
        },
        Target {
            name: "kcache",
            root: kcache.path(),
        },
    ];
    for r in &references {
        if let Some(m) = &r.mount {
            targets.push(Target {
                name: r.name,
                root: m.path(),
            });
        }
    }

    let mut rows = Vec::new();
    let outcome = run_all(
        &selected,
        &targets,
        &kcache_bin,
        &run_dir,
        (sizes, args.passes),
        &probe,
        &mut rows,
    );
    drop(targets);

    if !rows.is_empty() {
        let columns: Vec<(&str, bool)> = references
            .iter()
            .map(|r| (r.name, r.mount.is_some()))
            .collect();
        print_table(&rows, &columns);
    }

    // Unmount explicitly so failures are reported (Drop would only warn).
    let unmounted = kcache.unmount().context("unmounting kcache");
    for r in &mut references {
        if let Some(m) = &mut r.mount {
            if let Err(e) = m.unmount() {
                eprintln!("warning: unmounting {}: {e:#}", r.name);
            }
        }
    }
    outcome?;
    unmounted
}

fn run_all(
    selected: &[Workload],
    targets: &[Target<'_>],
    kcache_bin: &Path,
    run_dir: &RunDir,
    (sizes, passes): (Sizes, u32),
    probe: &requests::Probe,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let base_seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    for (wi, &workload) in selected.iter().enumerate() {
        println!("== {}", workload.name());
        if workload.own_stores() {
            let native = targets.first().context("no native target")?;
            let dir = native.root.join(workload.name());
            fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let env = own_stores::Env {
                kcache: kcache_bin,
                run_dir,
                native: &dir,
            };
            let seed = base_seed ^ ((wi as u64) << 56);
            let pairs = own_stores::run(workload, &env, sizes, seed)
                .with_context(|| workload.name().to_string())?;
            // A baseline that was the measured phase of the previous pair is printed once.
            let mut printed: Option<&str> = None;
            for pair in pairs {
                if let Some((name, baseline)) = &pair.baseline {
                    if printed != Some(*name) {
                        print_phase(name, baseline, None);
                    }
                }
                print_phase(
                    pair.name,
                    &pair.measured,
                    pair.baseline.as_ref().map(|(name, b)| (*name, b)),
                );
                printed = Some(pair.name);
                rows.push(Row {
                    native: pair.baseline,
                    kcache: Some(pair.measured),
                    references: Vec::new(),
                });
            }
            continue;
        }
        // Made once per run, outside every timer, and extracted by every target and pass.
        let tarball = if workload == Workload::TarX {
            let dir = run_dir.subdir("tar-x-source")?;
            let seed = base_seed ^ ((wi as u64) << 56);
            Some(
                tar_x::Tarball::create(&dir, sizes.tar_files, seed)
                    .context("making the tarball")?,
            )
        } else {
            None
        };
        // passes[target][pass]: the targets alternate within each pass, so a slow spell of
        // the machine hits all of them rather than one.
        let mut runs: Vec<Vec<Vec<Phase>>> = vec![Vec::new(); targets.len()];
        // A reference file system that fails (libfuse's example servers are not
        // production code) loses its column for this workload instead of ending the run.
        let mut failed = vec![false; targets.len()];
        for pass in 0..passes {
            if passes > 1 {
                println!("  -- pass {} of {passes}", pass + 1);
            }
            for (ti, target) in targets.iter().enumerate() {
                if failed[ti] {
                    continue;
                }
                let dir = target.root.join(format!("{}-{pass}", workload.name()));
                // Distinct data per workload, target and pass, so no layer can dedup across
                // them.
                let seed = base_seed
                    ^ ((wi as u64) << 56)
                    ^ ((ti as u64 + 1) << 48)
                    ^ (u64::from(pass) << 40);
                let probe = (target.name == "kcache").then_some(probe);
                let phases = match fs::create_dir(&dir)
                    .with_context(|| format!("creating {}", dir.display()))
                    .and_then(|()| {
                        workloads::run(workload, &dir, sizes, seed, probe, tarball.as_ref())
                    })
                    .with_context(|| format!("{} on {}", workload.name(), target.name))
                {
                    Ok(p) => p,
                    Err(e) if ti >= 2 => {
                        println!(
                            "  {:<TARGET_WIDTH$} failed, no column for this workload: {e:#}",
                            target.name
                        );
                        failed[ti] = true;
                        runs[ti].clear();
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                for (pi, p) in phases.iter().enumerate() {
                    let native = (ti > 0).then(|| ("native", &runs[0][pass as usize][pi]));
                    print_phase(target.name, p, native);
                    if let Some(r) = &p.requests {
                        println!(
                            "  {:<TARGET_WIDTH$} {:<56} FUSE requests per file: {r}",
                            "", ""
                        );
                    }
                }
                // No cleanup between targets: a mass delete can slow the file system's
                // inode allocation for a while (seen on a journal-less ext4), which would
                // penalise whichever target runs next. Everything goes when the run dir is
                // removed.
                runs[ti].push(phases);
            }
        }
        let per_target: Vec<Vec<Phase>> = runs.into_iter().map(median_phases).collect();
        if passes > 1 {
            println!("  -- median of {passes} passes");
            for (ti, target) in targets.iter().enumerate() {
                for (pi, p) in per_target[ti].iter().enumerate() {
                    let native = (ti > 0).then(|| ("native", &per_target[0][pi]));
                    print_phase(target.name, p, native);
                }
            }
        }
        // Targets are native, kcache, then the references in use.
        let mut per_target = per_target.into_iter();
        let native = per_target.next().unwrap_or_default();
        let mut kcache = per_target.next().unwrap_or_default().into_iter();
        let mut references: Vec<(&'static str, std::vec::IntoIter<Phase>)> = targets
            .iter()
            .skip(2)
            .map(|t| t.name)
            .zip(per_target.map(Vec::into_iter))
            .collect();
        for n in native {
            rows.push(Row {
                native: Some(("native", n)),
                kcache: kcache.next(),
                references: references
                    .iter_mut()
                    .filter_map(|(name, phases)| phases.next().map(|p| (*name, p)))
                    .collect(),
            });
        }
    }
    Ok(())
}

/// Each phase of a workload's passes with its median time (and the last pass's request
/// counts).
fn median_phases(passes: Vec<Vec<Phase>>) -> Vec<Phase> {
    let mut passes = passes.into_iter();
    let Some(mut first) = passes.next() else {
        return Vec::new();
    };
    let rest: Vec<Vec<Phase>> = passes.collect();
    for (pi, p) in first.iter_mut().enumerate() {
        let mut secs: Vec<f64> = std::iter::once(p.secs)
            .chain(rest.iter().filter_map(|r| r.get(pi).map(|q| q.secs)))
            .collect();
        secs.sort_by(f64::total_cmp);
        p.secs = secs[secs.len() / 2];
        if let Some(last) = rest.last().and_then(|r| r.get(pi)) {
            p.requests.clone_from(&last.requests);
        }
    }
    first
}

fn ratio(native: &Phase, other: &Phase) -> f64 {
    native.secs / other.secs.max(1e-9)
}

/// Two decimals, unless that would show a ratio far below 1 as zero.
fn fmt_ratio(r: f64) -> String {
    if r >= 0.01 {
        format!("{r:.2}")
    } else {
        format!("{r:.1e}")
    }
}

fn verdict(native: &Phase, other: &Phase, goal: f64) -> &'static str {
    if ratio(native, other) >= goal {
        "PASS"
    } else {
        "MISS"
    }
}

/// For goals in seconds, kept by the measured phase.
fn verdict_secs(p: &Phase, max_secs: f64) -> &'static str {
    if p.secs <= max_secs {
        "PASS"
    } else {
        "MISS"
    }
}

/// One progress line; with a baseline, the ratio against it (named unless native).
fn print_phase(target: &str, p: &Phase, baseline: Option<(&str, &Phase)>) {
    let mut ratio = match baseline {
        None => String::new(),
        Some((name, b)) => {
            let vs = if name == "native" {
                String::new()
            } else {
                format!(" vs {name}")
            };
            let goal = match b.goal {
                Some(g) => format!(" (goal >= {g:.2}: {})", verdict(b, p, g)),
                None => String::new(),
            };
            format!("  ratio {}{vs}{goal}", fmt_ratio(ratio(b, p)))
        }
    };
    if let Some(max) = p.max_secs {
        let sep = if ratio.is_empty() { "  " } else { " " };
        ratio.push_str(&format!("{sep}(goal <= {max} s: {})", verdict_secs(p, max)));
    }
    println!(
        "  {:<TARGET_WIDTH$} {:<56} {:>9.3} s {:>14}{ratio}",
        target,
        p.label,
        p.secs,
        p.amount.throughput(p.secs)
    );
}

fn cell(p: &Phase) -> String {
    match p.amount {
        Amount::Latency => format!("{:.3} s", p.secs),
        amount => format!("{:.3} s ({})", p.secs, amount.throughput(p.secs)),
    }
}

/// Markdown, so it can be pasted into the README as is. `references` are the reference
/// columns, each with whether it ran in this run.
fn print_table(rows: &[Row], references: &[(&str, bool)]) {
    println!();
    for line in table_lines(rows, references) {
        println!("{line}");
    }
    println!();
    println!("ratio = native time / kcache time (1.00 = as fast as native, higher is better)");
    for baseline in rows
        .iter()
        .filter_map(|r| r.native.as_ref().map(|(name, _)| *name))
        .filter(|&b| b != "native")
        .collect::<std::collections::BTreeSet<_>>()
    {
        if baseline == "kcache" {
            println!(
                "rows \"A vs B\" compare two {baseline} setups: B's time is in the native \
                 column, ratio = B time / A time"
            );
        } else {
            println!(
                "rows with \"({baseline})\" in the native column compare kcache with \
                 {baseline}: ratio = {baseline} time / kcache time"
            );
        }
    }
}

/// The table's header, rule and one line per row.
fn table_lines(rows: &[Row], references: &[(&str, bool)]) -> Vec<String> {
    let mut header = "| workload | native | kcache | ratio | goal |".to_string();
    let mut rule = "| --- | ---: | ---: | ---: | --- |".to_string();
    for (name, _) in references {
        header.push_str(&format!(" {name} ratio |"));
        rule.push_str(" ---: |");
    }
    let mut lines = vec![header, rule];
    for r in rows {
        let native = r.native.as_ref().map(|(_, p)| p);
        let mut goals = Vec::new();
        if let Some(g) = native.and_then(|n| n.goal) {
            goals.push(match (native, &r.kcache) {
                (Some(n), Some(k)) => format!(">= {g:.2} {}", verdict(n, k, g)),
                _ => format!(">= {g:.2}"),
            });
        }
        if let Some(k) = &r.kcache {
            if let Some(max) = k.max_secs {
                goals.push(format!("<= {max} s {}", verdict_secs(k, max)));
            }
        }
        let goal = if goals.is_empty() {
            "-".to_string()
        } else {
            goals.join("; ")
        };
        let kc = r.kcache.as_ref().map_or("-".into(), cell);
        let rt = match (native, &r.kcache) {
            (Some(n), Some(k)) => fmt_ratio(ratio(n, k)),
            _ => "-".into(),
        };
        let refs: String = references
            .iter()
            .map(|&(name, used)| {
                let phase = r
                    .references
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, p)| p);
                let cell = match (native, phase, used) {
                    (Some(n), Some(b), _) => fmt_ratio(ratio(n, b)),
                    (_, None, false) => "n/a".into(),
                    _ => "-".into(),
                };
                format!(" {cell} |")
            })
            .collect();
        let nat = match &r.native {
            Some((name, p)) if *name == "native" || *name == "kcache" => cell(p),
            Some((name, p)) => format!("{} ({name})", cell(p)),
            None => "-".into(),
        };
        lines.push(format!(
            "| {} | {nat} | {kc} | {rt} | {goal} |{refs}",
            r.label()
        ));
    }
    lines
}

fn resolve_kcache(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("this program has no parent dir")?
            .join("kcache"),
    };
    if !path.is_file() {
        bail!(
            "kcache binary not found at {}: build it with `cargo build --release` \
             or pass --kcache PATH",
            path.display()
        );
    }
    // Made absolute because mount helpers may chdir, and we call it again to unmount.
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}

/// Mounts reference `name` over `<name>-src` at `<name>-mnt`, both directly under the run
/// dir (where `RunDir` looks for mounts left behind), logging to `<name>.log`.
fn mount_reference(
    run_dir: &RunDir,
    name: &str,
    mount: impl FnOnce(&Path, &Path, &Path) -> Result<Mount>,
) -> Result<Mount> {
    let src = run_dir.subdir(&format!("{name}-src"))?;
    let mnt = run_dir.subdir(&format!("{name}-mnt"))?;
    let log = run_dir.path().join(format!("{name}.log"));
    mount(&src, &mnt, &log).with_context(|| format!("mounting {name}"))
}

/// `--passthrough-hp`, else `$KCACHE_BENCH_PASSTHROUGH_HP`; a path given that is not an
/// executable file is an error rather than a silently missing column.
fn resolve_passthrough_hp(given: Option<&Path>) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("KCACHE_BENCH_PASSTHROUGH_HP") {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            _ => return Ok(None),
        },
    };
    let meta = fs::metadata(&path)
        .with_context(|| format!("passthrough_hp not found at {}", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!(
            "passthrough_hp at {} is not an executable file",
            path.display()
        );
    }
    // Absolute because the daemon is started with the run dir's paths, from any cwd.
    path.canonicalize()
        .map(Some)
        .with_context(|| format!("resolving {}", path.display()))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| {
                p.metadata()
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
    })
}

/// Names the file system under the scratch dir, since "same disk" only means something
/// if that disk is real (tmpfs would flatter every number).
fn fs_type(path: &Path) -> String {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return "unknown fs".into();
    };
    // SAFETY: `st` is plain data; statfs only writes into it when it returns 0.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown fs".into();
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs (not a disk!)".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6573_5546 => "fuse".into(),
        other => format!("fs magic {other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workloads::Amount;

    fn phase(secs: f64) -> Phase {
        Phase {
            label: "p".into(),
            goal: None,
            max_secs: None,
            amount: Amount::Files(1),
            secs,
            requests: Some(format!("{secs}")),
        }
    }

    #[test]
    fn each_reference_has_a_column_with_its_ratio_or_n_a_when_unused() {
        let rows = [
            Row {
                native: Some(("native", phase(1.0))),
                kcache: Some(phase(2.0)),
                references: vec![("passthrough_hp", phase(4.0))],
            },
            Row {
                native: Some(("curl", phase(1.0))),
                kcache: Some(phase(1.0)),
                references: Vec::new(),
            },
        ];
        let lines = table_lines(&rows, &[("bindfs", false), ("passthrough_hp", true)]);
        assert_eq!(
            lines[0],
            "| workload | native | kcache | ratio | goal | bindfs ratio | passthrough_hp ratio |"
        );
        assert_eq!(lines[1], "| --- | ---: | ---: | ---: | --- | ---: | ---: |");
        assert!(
            lines[2].ends_with("| 0.50 | - | n/a | 0.25 |"),
            "{}",
            lines[2]
        );
        assert!(lines[3].ends_with("| 1.00 | - | n/a | - |"), "{}", lines[3]);
    }

    #[test]
    fn each_phase_takes_the_median_of_its_passes() {
        let m = median_phases(vec![
            vec![phase(5.0), phase(1.0)],
            vec![phase(1.0), phase(3.0)],
            vec![phase(3.0), phase(2.0)],
        ]);
        assert_eq!(m.iter().map(|p| p.secs).collect::<Vec<_>>(), [3.0, 2.0]);
        assert_eq!(m[1].requests.as_deref(), Some("2"));
        assert!(median_phases(Vec::new()).is_empty());
    }
}
