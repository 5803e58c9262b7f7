//! The timed workloads. Each runs inside one target directory (native, kcache mount or a
//! reference mount: bindfs, passthrough_hp) using plain std::fs/libc calls (`tar-x`, in
//! `tar_x.rs`, runs GNU tar), and returns one timing per phase.
//!
//! Data generation, setup and verification happen outside the timed sections so that
//! only file system work is measured. The workloads that need kcache stores of their own
//! (`quota-overhead`, `evict`) live in `own_stores.rs`, those of the remote tier
//! (`remote-*`) in `remote.rs`; both share the helpers here.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;

use crate::requests::{per_file, Counts, Probe};
use crate::tar_x::Tarball;

pub const MIB: usize = 1 << 20;
pub const SMALL_FILE_SIZE: usize = 4096;
const SMALL_FILE_DIRS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// a) warm sequential read of one large file with 1 MiB buffers
    SeqRead,
    /// b) many 4 KiB files created via temp file + rename, then stat, then read
    SmallFiles,
    /// c) large file written with 1 MiB writes, then fsync, then close
    FsyncWrite,
    /// d) open+read of many small files on a kcache mount with a quota vs one without
    QuotaOverhead,
    /// e) `kcache evict --to 0` of a store full of small files vs `rm -rf` of as many files
    Evict,
    /// f) a large file pulled from an HTTP upstream, read through a fresh mount, vs curl
    RemoteFetch,
    /// g) time to the first 4 KiB of a cold, larger file from an HTTP upstream
    RemoteTtfb,
    /// h) `kcache pull` of a snapshot with many small files from a file:// upstream
    RemotePull,
    /// i) as small-files, but every file has the same 4 KiB content
    SmallFilesShared,
    /// j) GNU tar extracting a source tree (many small files, nested dirs, a few symlinks)
    TarX,
}

impl Workload {
    pub const ALL: [Workload; 10] = [
        Workload::SeqRead,
        Workload::SmallFiles,
        Workload::SmallFilesShared,
        Workload::TarX,
        Workload::FsyncWrite,
        Workload::QuotaOverhead,
        Workload::Evict,
        Workload::RemoteFetch,
        Workload::RemoteTtfb,
        Workload::RemotePull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqRead => "seq-read",
            Workload::SmallFiles => "small-files",
            Workload::FsyncWrite => "fsync-write",
            Workload::QuotaOverhead => "quota-overhead",
            Workload::Evict => "evict",
            Workload::RemoteFetch => "remote-fetch",
            Workload::RemoteTtfb => "remote-ttfb",
            Workload::RemotePull => "remote-pull",
            Workload::SmallFilesShared => "small-files-shared",
            Workload::TarX => "tar-x",
        }
    }

    /// Whether the workload sets up kcache stores of its own (see `own_stores.rs` and
    /// `remote.rs`) instead of running once in each target directory.
    pub fn own_stores(self) -> bool {
        matches!(
            self,
            Workload::QuotaOverhead
                | Workload::Evict
                | Workload::RemoteFetch
                | Workload::RemoteTtfb
                | Workload::RemotePull
        )
    }
}

/// Problem sizes; `--quick` shrinks them for a smoke run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub big_file: usize,
    pub small_files: usize,
    /// Files in the tree `tar-x` extracts.
    pub tar_files: usize,
    /// The file `remote-fetch` downloads.
    pub remote_file: usize,
    /// The cold file `remote-ttfb` reads the start of.
    pub remote_big_file: usize,
    /// Files in the snapshot `remote-pull` pulls.
    pub remote_files: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                big_file: 64 * MIB,
                small_files: 2_000,
                tar_files: 2_000,
                remote_file: 256 * MIB,
                remote_big_file: 1024 * MIB,
                remote_files: 10_000,
            }
        } else {
            Self {
                big_file: 1024 * MIB,
                small_files: 20_000,
                tar_files: 20_000,
                remote_file: 1024 * MIB,
                remote_big_file: 4096 * MIB,
                remote_files: 100_000,
            }
        }
    }
}

/// What a phase processed, to turn seconds into a throughput.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    Bytes(u64),
    Files(u64),
    /// Blobs removed from a store, with their total size.
    Blobs {
        count: u64,
        bytes: u64,
    },
    /// Nothing a throughput means anything for (a latency).
    Latency,
}

impl Amount {
    pub fn throughput(self, secs: f64) -> String {
        let secs = secs.max(1e-9);
        match self {
            Amount::Bytes(b) => format!("{:.0} MiB/s", b as f64 / MIB as f64 / secs),
            Amount::Files(n) => format!("{:.0} files/s", n as f64 / secs),
            Amount::Blobs { count, bytes } => format!(
                "{:.0} blobs/s, {:.1} MiB/s",
                count as f64 / secs,
                bytes as f64 / MIB as f64 / secs
            ),
            Amount::Latency => "-".to_string(),
        }
    }
}

/// One timed phase of a workload on one target.
#[derive(Clone, Debug)]
pub struct Phase {
    pub label: String,
    /// Minimum ratio against the baseline; `None` for phases measured only for context.
    pub goal: Option<f64>,
    /// Longest acceptable time, for goals stated in seconds rather than as a ratio.
    pub max_secs: Option<f64>,
    pub amount: Amount,
    pub secs: f64,
    /// FUSE requests per file in this phase, by kind (kcache targets with a probe only).
    pub requests: Option<String>,
}

/// Runs `workload` in `dir`; `probe` reads the FUSE request counters of a kcache target;
/// `tarball` is the run's tarball for `tar-x`.
pub fn run(
    workload: Workload,
    dir: &Path,
    sizes: Sizes,
    seed: u64,
    probe: Option<&Probe>,
    tarball: Option<&Tarball>,
) -> Result<Vec<Phase>> {
    match workload {
        Workload::SeqRead => seq_read(dir, sizes.big_file, seed),
        Workload::SmallFiles => small_files(dir, sizes.small_files, seed, probe, Content::Distinct),
        Workload::SmallFilesShared => {
            small_files(dir, sizes.small_files, seed, probe, Content::Shared)
        }
        Workload::TarX => tarball
            .context("tar-x runs without its tarball")?
            .extract(dir, probe),
        Workload::FsyncWrite => fsync_write(dir, sizes.big_file, seed),
        Workload::QuotaOverhead
        | Workload::Evict
        | Workload::RemoteFetch
        | Workload::RemoteTtfb
        | Workload::RemotePull => bail!(
            "{} sets up its own stores and does not run in a target directory",
            workload.name()
        ),
    }
}

/// a) Write, close, read once to warm the cache (verifying contents), then time a
///    second full read.
fn seq_read(dir: &Path, size: usize, seed: u64) -> Result<Vec<Phase>> {
    let path = dir.join("big.bin");
    let mut buf = vec![0u8; MIB];

    let mut rng = Prng::new(seed);
    let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..size / MIB {
        check_interrupted()?;
        rng.fill(&mut buf);
        f.write_all(&buf)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    close_checked(f, &path)?;

    // The warm-up pass doubles as the correctness check, so the timed pass stays pure.
    let mut rng = Prng::new(seed);
    let mut expected = vec![0u8; MIB];
    let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    for i in 0..size / MIB {
        check_interrupted()?;
        rng.fill(&mut expected);
        f.read_exact(&mut buf)
            .with_context(|| format!("warm read of {} at MiB {i}", path.display()))?;
        ensure!(buf == expected, "{}: wrong data in MiB {i}", path.display());
    }
    ensure!(
        f.read(&mut buf)? == 0,
        "{}: longer than written",
        path.display()
    );
    drop(f);
    sync_all_filesystems();

    let start = Instant::now();
    let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut total = 0usize;
    loop {
        check_interrupted()?;
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    drop(f);
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        total == size,
        "{}: read {total} bytes, expected {size}",
        path.display()
    );

    Ok(vec![Phase {
        label: format!("seq read {} (warm, 1 MiB buf)", human_size(size)),
        goal: Some(0.9),
        max_secs: None,
        amount: Amount::Bytes(size as u64),
        secs,
        requests: None,
    }])
}

/// What the files of a small-files workload hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Random, so that no two dedup (`small-files`).
    Distinct,
    /// One random 4 KiB block in every file (`small-files-shared`): a content-addressed
    /// store keeps one blob, which is what a tree of identical stubs or licence files
    /// costs it.
    Shared,
}

/// b) pip-style install: each file is written to a temp name in its final directory and
///    renamed into place; then every file is stat'ed, then read, in the same mount.
///    i) the same with one content for all files.
fn small_files(
    dir: &Path,
    count: usize,
    seed: u64,
    probe: Option<&Probe>,
    content: Content,
) -> Result<Vec<Phase>> {
    // Read outside the timed parts; a probe that fails is an error, not a silent blank.
    let read = || probe.map(|p| p.counts()).transpose();
    let dirs = create_small_file_dirs(dir)?;
    // Precompute names and contents so the timed loop only does file system calls.
    let data = match content {
        Content::Distinct => small_file_data(count, seed),
        Content::Shared => small_file_data(1, seed).repeat(count),
    };
    // The README quotes the labels of `small-files`, so they stay as they are.
    let what = match content {
        Content::Distinct => "small files",
        Content::Shared => "small files, shared content",
    };
    let finals: Vec<PathBuf> = (0..count).map(|i| small_file_path(&dirs, i)).collect();
    let temps: Vec<PathBuf> = (0..count)
        .map(|i| dirs[i % SMALL_FILE_DIRS].join(format!(".f{i:06}.bin.tmp-{seed:016x}")))
        .collect();
    sync_all_filesystems();

    let c0 = read()?;
    let start = Instant::now();
    for i in 0..count {
        check_interrupted()?;
        let tmp = &temps[i];
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&data[i * SMALL_FILE_SIZE..(i + 1) * SMALL_FILE_SIZE])
            .with_context(|| format!("writing {}", tmp.display()))?;
        close_checked(f, tmp)?;
        fs::rename(tmp, &finals[i])
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
    }
    let create_secs = start.elapsed().as_secs_f64();
    let c1 = read()?;

    let start = Instant::now();
    for p in &finals {
        check_interrupted()?;
        let len = fs::metadata(p)
            .with_context(|| format!("stat {}", p.display()))?
            .len();
        ensure!(len == SMALL_FILE_SIZE as u64, "{}: size {len}", p.display());
    }
    let stat_secs = start.elapsed().as_secs_f64();
    let c2 = read()?;

    let start = Instant::now();
    read_files(&finals)?;
    let read_secs = start.elapsed().as_secs_f64();
    let c3 = read()?;
    let per = |a: &Option<Counts>, b: &Option<Counts>| match (a, b) {
        (Some(a), Some(b)) => Some(per_file(a, b, count)),
        _ => None,
    };

    // Contents are checked after timing; a leftover temp file means a rename misbehaved.
    check_small_files(&dirs, &finals, &data)?;

    let amount = Amount::Files(count as u64);
    Ok(vec![
        Phase {
            label: format!("{what}: create {count} x 4 KiB (tmp + rename)"),
            goal: Some(0.5),
            max_secs: None,
            amount,
            secs: create_secs,
            requests: per(&c0, &c1),
        },
        Phase {
            label: format!("{what}: stat {count}"),
            goal: Some(0.5),
            max_secs: None,
            amount,
            secs: stat_secs,
            requests: per(&c1, &c2),
        },
        Phase {
            label: format!("{what}: read {count}"),
            goal: Some(0.3),
            max_secs: None,
            amount,
            secs: read_secs,
            requests: per(&c2, &c3),
        },
    ])
}

/// Creates the subdirectories of `dir` that small files are spread over (as in an
/// unpacked package, rather than one huge directory) and returns them.
pub fn create_small_file_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = (0..SMALL_FILE_DIRS)
        .map(|i| dir.join(format!("d{i:02x}")))
        .collect();
    for d in &dirs {
        fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(dirs)
}

/// Where small file `i` lives among `dirs`.
pub fn small_file_path(dirs: &[PathBuf], i: usize) -> PathBuf {
    dirs[i % dirs.len()].join(format!("f{i:06}.bin"))
}

/// The contents of `count` small files back to back, random so that no two dedup.
pub fn small_file_data(count: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; count * SMALL_FILE_SIZE];
    Prng::new(seed).fill(&mut data);
    data
}

/// Creates file `i` of `paths` with the `i`-th `SMALL_FILE_SIZE` bytes of `data`.
pub fn write_small_files(paths: &[PathBuf], data: &[u8]) -> Result<()> {
    ensure!(
        data.len() == paths.len() * SMALL_FILE_SIZE,
        "{} bytes of data for {} small files",
        data.len(),
        paths.len()
    );
    for (p, content) in paths.iter().zip(data.chunks_exact(SMALL_FILE_SIZE)) {
        check_interrupted()?;
        let mut f = File::create(p).with_context(|| format!("creating {}", p.display()))?;
        f.write_all(content)
            .with_context(|| format!("writing {}", p.display()))?;
        close_checked(f, p)?;
    }
    Ok(())
}

/// Opens, reads to the end and closes every file: the timed part of the small-file read
/// phases. Fails unless exactly `SMALL_FILE_SIZE` bytes per file were read.
pub fn read_files(paths: &[PathBuf]) -> Result<()> {
    let mut buf = [0u8; 2 * SMALL_FILE_SIZE];
    let mut total = 0usize;
    for p in paths {
        check_interrupted()?;
        let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", p.display()))?;
            if n == 0 {
                break;
            }
            total += n;
        }
    }
    let expected = paths.len() * SMALL_FILE_SIZE;
    ensure!(
        total == expected,
        "read {total} bytes in total, expected {expected}"
    );
    Ok(())
}

/// Checks, untimed, that file `i` holds the `i`-th `SMALL_FILE_SIZE` bytes of `data` and
/// that `dirs` hold nothing else.
pub fn check_small_files(dirs: &[PathBuf], paths: &[PathBuf], data: &[u8]) -> Result<()> {
    for (p, expected) in paths.iter().zip(data.chunks_exact(SMALL_FILE_SIZE)) {
        check_interrupted()?;
        let got = fs::read(p).with_context(|| format!("re-reading {}", p.display()))?;
        ensure!(got == expected, "{}: wrong contents", p.display());
    }
    let listed: usize = dirs
        .iter()
        .map(|d| fs::read_dir(d).map(|r| r.count()))
        .sum::<std::io::Result<usize>>()
        .context("listing small-file dirs")?;
    ensure!(
        listed == paths.len(),
        "found {listed} entries, expected {}",
        paths.len()
    );
    Ok(())
}

/// c) Streaming write of random-ish data, fsync, close — all inside the timer.
fn fsync_write(dir: &Path, size: usize, seed: u64) -> Result<Vec<Phase>> {
    let path = dir.join("written.bin");
    // Generated up front so PRNG cost does not dilute the ratio; random so that no
    // layer can compress or skip zero pages.
    let mut data = vec![0u8; size];
    Prng::new(seed).fill(&mut data);
    sync_all_filesystems();

    let start = Instant::now();
    let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    for chunk in data.chunks(MIB) {
        check_interrupted()?;
        f.write_all(chunk)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    close_checked(f, &path)?;
    let secs = start.elapsed().as_secs_f64();

    let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; MIB];
    for (i, chunk) in data.chunks(MIB).enumerate() {
        check_interrupted()?;
        f.read_exact(&mut buf[..chunk.len()])
            .with_context(|| format!("reading back {} at MiB {i}", path.display()))?;
        ensure!(
            buf[..chunk.len()] == *chunk,
            "{}: wrong data in MiB {i}",
            path.display()
        );
    }
    ensure!(
        f.read(&mut buf)? == 0,
        "{}: longer than written",
        path.display()
    );

    Ok(vec![Phase {
        label: format!("write {} (1 MiB writes) + fsync + close", human_size(size)),
        goal: Some(0.5),
        max_secs: None,
        amount: Amount::Bytes(size as u64),
        secs,
        requests: None,
    }])
}

/// Closes explicitly because on FUSE `close` (FLUSH) can report write errors, which
/// dropping a `File` would silently ignore.
pub fn close_checked(f: File, path: &Path) -> Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by `File`, so we own it and close it exactly once.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("closing {}", path.display()));
    }
    Ok(())
}

/// Flushes dirty data left by earlier phases so it is not written back inside a timer.
pub fn sync_all_filesystems() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

pub fn human_size(bytes: usize) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// splitmix64: fast and good enough to defeat compression and dedup.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let len = rest.len();
        rest.copy_from_slice(&self.next_u64().to_le_bytes()[..len]);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns Ctrl-C / SIGTERM into an error at the next loop step, so the mount guards get
/// to unmount. SA_RESETHAND makes a second Ctrl-C kill the process as usual.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and
        // the sigaction struct is fully initialised before use.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}
