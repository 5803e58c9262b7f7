//! Workloads that need kcache stores of their own instead of a directory on the shared
//! mount: `quota-overhead` compares two kcache mounts with each other, and `evict` runs the
//! CLI on an unmounted store; the remote-tier workloads (in `remote.rs`) push to and pull
//! from upstreams. Each yields pairs of phases, a baseline and what is measured against it
//! (ratio = baseline time / measured time, as for every other row), or a measured phase
//! alone when its goal is a time.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::mounts::{self, Mount, RunDir};
use crate::remote;
use crate::workloads::{
    check_small_files, create_small_file_dirs, human_size, read_files, small_file_data,
    small_file_path, sync_all_filesystems, write_small_files, Amount, Phase, Sizes, Workload,
    SMALL_FILE_SIZE,
};

/// Far above what the workload stores, so the quota mount pays for keeping a quota but
/// never evicts (which would change what is read).
const QUOTA: u64 = 10 << 30;

/// Timed read passes per target; the median is reported. Odd, so the median is a real run.
const REPEATS: usize = 5;

/// `kcache evict` removes one blob per transaction, so a slow disk can take a while.
const EVICT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `rm -rf` of the baseline tree; anything near this means the disk is in trouble.
const RM_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// What these workloads need beyond a target directory.
pub struct Env<'a> {
    pub kcache: &'a Path,
    pub run_dir: &'a RunDir,
    /// The workload's (empty) directory on the native target, for the baselines.
    pub native: &'a Path,
}

/// A measured phase and the baseline its ratio is computed against.
pub struct Pair {
    /// Who ran the baseline ("native", another target such as "kcache", or a tool such as
    /// "curl") and its phase; `None` for a phase judged by its time alone.
    pub baseline: Option<(&'static str, Phase)>,
    pub name: &'static str,
    pub measured: Phase,
}

pub fn run(workload: Workload, env: &Env<'_>, sizes: Sizes, seed: u64) -> Result<Vec<Pair>> {
    match workload {
        Workload::QuotaOverhead => quota_overhead(env, sizes.small_files, seed),
        Workload::Evict => evict(env, sizes.small_files, seed),
        Workload::RemoteFetch => remote::fetch(env, sizes.remote_file, seed),
        Workload::RemoteTtfb => remote::ttfb(env, sizes.remote_big_file, seed),
        Workload::RemotePull => remote::pull(env, sizes.remote_files, seed),
        Workload::SeqRead
        | Workload::SmallFiles
        | Workload::SmallFilesShared
        | Workload::TarX
        | Workload::FsyncWrite => bail!(
            "{} runs in each target directory, not with stores of its own",
            workload.name()
        ),
    }
}

/// A store and mountpoint of one workload. Both go directly under the run dir: that is
/// where `RunDir` looks for mounts left behind before it deletes anything.
pub(crate) struct OwnStore {
    pub(crate) store: PathBuf,
    pub(crate) mountpoint: PathBuf,
    log: PathBuf,
    quota: Option<u64>,
}

impl OwnStore {
    pub(crate) fn create(run_dir: &RunDir, name: &str, quota: Option<u64>) -> Result<Self> {
        Ok(Self {
            store: run_dir.subdir(&format!("{name}-store"))?,
            mountpoint: run_dir.subdir(&format!("{name}-mnt"))?,
            log: run_dir.path().join(format!("{name}.log")),
            quota,
        })
    }

    pub(crate) fn mount(&self, kcache: &Path) -> Result<Mount> {
        Mount::kcache(
            kcache,
            &self.store,
            &self.mountpoint,
            &self.log,
            self.quota,
            None,
        )
        .with_context(|| format!("mounting {}", self.store.display()))
    }

    /// Mounts, creates `data` as small files under the mount root, unmounts (which waits
    /// for the daemon's last commit) and returns the dirs and files for later mounts.
    fn fill(&self, kcache: &Path, data: &[u8]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
        let mut mount = self.mount(kcache)?;
        let dirs = create_small_file_dirs(mount.path())?;
        let paths = small_file_paths(&dirs, data.len() / SMALL_FILE_SIZE);
        write_small_files(&paths, data)
            .with_context(|| format!("filling {}", self.store.display()))?;
        mount
            .unmount()
            .with_context(|| format!("unmounting {}", self.mountpoint.display()))?;
        Ok((dirs, paths))
    }
}

fn small_file_paths(dirs: &[PathBuf], count: usize) -> Vec<PathBuf> {
    (0..count).map(|i| small_file_path(dirs, i)).collect()
}

/// d) The same small files in three trees: native, kcache without a quota and kcache with
///    a quota nothing reaches. Each timed pass opens, reads and closes every file on a
///    fresh mount, so lookups and opens reach the daemon instead of the kernel's dentry and
///    page caches (the blob files themselves stay in the host's page cache, as the native
///    files do). Passes alternate between the two mounts so neither profits from going
///    second, and the median of `REPEATS` is reported, since the goal is a 5% difference.
fn quota_overhead(env: &Env<'_>, count: usize, seed: u64) -> Result<Vec<Pair>> {
    let data = small_file_data(count, seed);
    let native_dirs = create_small_file_dirs(env.native)?;
    let native_paths = small_file_paths(&native_dirs, count);
    write_small_files(&native_paths, &data)?;
    // Separate stores, so the same data does not dedup between them.
    let stores = [
        OwnStore::create(env.run_dir, "quota-off", None)?,
        OwnStore::create(env.run_dir, "quota-on", Some(QUOTA))?,
    ];
    let trees = [
        stores[0].fill(env.kcache, &data)?,
        stores[1].fill(env.kcache, &data)?,
    ];
    check_small_files(&native_dirs, &native_paths, &data)?;

    let mut native_secs = Vec::with_capacity(REPEATS);
    let mut kcache_secs: [Vec<f64>; 2] = Default::default();
    for rep in 0..REPEATS {
        sync_all_filesystems();
        let start = Instant::now();
        read_files(&native_paths)?;
        native_secs.push(start.elapsed().as_secs_f64());

        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let store = &stores[i];
            let (dirs, paths) = &trees[i];
            let mut mount = store.mount(env.kcache)?;
            // Accesses noted by the previous pass are written at unmount; keep that
            // writeback out of this timer.
            sync_all_filesystems();
            let start = Instant::now();
            read_files(paths).with_context(|| format!("reading {}", store.store.display()))?;
            kcache_secs[i].push(start.elapsed().as_secs_f64());
            if rep == REPEATS - 1 {
                // A quota that evicted anything would show as missing or wrong files here.
                check_small_files(dirs, paths, &data)
                    .with_context(|| format!("checking {}", store.store.display()))?;
            }
            mount
                .unmount()
                .with_context(|| format!("unmounting {}", store.mountpoint.display()))?;
        }
    }
    for (name, secs) in [
        ("native", &native_secs),
        ("kcache", &kcache_secs[0]),
        ("kc+quota", &kcache_secs[1]),
    ] {
        let all: Vec<String> = secs.iter().map(|s| format!("{s:.3}")).collect();
        println!("  {name:<8} passes (s, median reported): {}", all.join(" "));
    }

    let amount = Amount::Files(count as u64);
    let phase = |label: &str, goal: Option<f64>, secs: &[f64]| Phase {
        label: label.to_string(),
        goal,
        max_secs: None,
        amount,
        secs: median(secs),
        requests: None,
    };
    let fresh = format!("quota-overhead: open+read {count} x 4 KiB, remounted");
    let quota = format!(
        "quota-overhead: open+read, --quota {} vs no quota",
        human_size(QUOTA as usize)
    );
    Ok(vec![
        Pair {
            baseline: Some(("native", phase(&fresh, None, &native_secs))),
            name: "kcache",
            measured: phase(&fresh, None, &kcache_secs[0]),
        },
        Pair {
            baseline: Some(("kcache", phase(&quota, Some(0.95), &kcache_secs[0]))),
            name: "kc+quota",
            measured: phase(&quota, Some(0.95), &kcache_secs[1]),
        },
    ])
}

/// e) Fills a store with `count` distinct small files through a mount, unmounts it and
///    times `kcache evict --to 0`, as a process of its own, so opening the store counts as
///    it does for an operator. Baseline: `rm -rf` of as many files of the same size in a
///    native directory, also as a process of its own.
fn evict(env: &Env<'_>, count: usize, seed: u64) -> Result<Vec<Pair>> {
    let data = small_file_data(count, seed);
    let store = OwnStore::create(env.run_dir, "evict", None)?;
    store.fill(env.kcache, &data)?;
    let tree = env.native.join("tree");
    fs::create_dir(&tree).with_context(|| format!("creating {}", tree.display()))?;
    let native_dirs = create_small_file_dirs(&tree)?;
    write_small_files(&small_file_paths(&native_dirs, count), &data)?;

    sync_all_filesystems();
    let mut rm = Command::new("rm");
    rm.arg("-rf").arg(&tree);
    let rm_out = env.run_dir.path().join("evict-rm.out");
    let rm_secs = time_command(&mut rm, &rm_out, RM_TIMEOUT)?;
    ensure!(
        !tree.exists(),
        "`rm -rf` exited 0 but left {}",
        tree.display()
    );

    // The deletes above are not written back inside the next timer.
    sync_all_filesystems();
    let mut cmd = Command::new(env.kcache);
    cmd.arg("evict")
        .arg("--store")
        .arg(&store.store)
        .arg("--to")
        .arg("0");
    let out = env.run_dir.path().join("evict.out");
    let secs = time_command(&mut cmd, &out, EVICT_TIMEOUT)?;
    let text = fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let (blobs, names) = parse_evicted(&text).context("parsing the output of `kcache evict`")?;
    ensure!(
        blobs == count as u64 && names == count as u64,
        "`kcache evict --to 0` evicted {blobs} blobs and {names} names, expected {count} of \
         each:\n{}",
        text.trim_end()
    );

    let label = format!("evict {count} x 4 KiB: `kcache evict --to 0` vs `rm -rf`");
    Ok(vec![Pair {
        baseline: Some((
            "native",
            Phase {
                label: label.clone(),
                goal: None,
                max_secs: None,
                amount: Amount::Files(count as u64),
                secs: rm_secs,
                requests: None,
            },
        )),
        name: "kcache",
        measured: Phase {
            label,
            goal: None,
            max_secs: None,
            amount: Amount::Blobs {
                count: blobs,
                bytes: blobs * SMALL_FILE_SIZE as u64,
            },
            secs,
            requests: None,
        },
    }])
}

/// Runs `cmd` to completion with its output in `out`; returns the wall-clock seconds.
pub(crate) fn time_command(cmd: &mut Command, out: &Path, timeout: Duration) -> Result<f64> {
    let what = mounts::describe(cmd);
    let start = Instant::now();
    let status = mounts::run_to_file(cmd, out, timeout)?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        status.success(),
        "`{what}` failed ({status}){}",
        mounts::log_tail(out)
    );
    Ok(secs)
}

/// Blob and name counts from the summary `kcache evict` prints:
/// "evicted N blobs (SIZE), M names; SIZE stored".
fn parse_evicted(output: &str) -> Result<(u64, u64)> {
    let line = output
        .lines()
        .find(|l| l.starts_with("evicted "))
        .with_context(|| format!("no line starting with \"evicted \" in:\n{output}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let count_before = |unit: &str| -> Result<u64> {
        let at = words
            .iter()
            .position(|w| w.trim_end_matches([',', ';']) == unit)
            .with_context(|| format!("no \"{unit}\" in {line:?}"))?;
        let n = at
            .checked_sub(1)
            .map(|i| words[i])
            .with_context(|| format!("no count before \"{unit}\" in {line:?}"))?;
        n.parse()
            .with_context(|| format!("{n:?} is not a count of {unit} in {line:?}"))
    };
    Ok((count_before("blobs")?, count_before("names")?))
}

pub(crate) fn median(secs: &[f64]) -> f64 {
    let mut sorted = secs.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_evict_summary() {
        let out = "evicted 20000 blobs (78.1 MiB), 20000 names; 0 B stored\n";
        assert_eq!(parse_evicted(out).unwrap(), (20000, 20000));
        assert!(parse_evicted("nothing to do\n").is_err());
        assert!(parse_evicted("evicted many blobs (1 B), 2 names; 0 B stored").is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
