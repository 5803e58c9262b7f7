//! Workloads of the remote tier (README, "Sharing a cache between machines"): content is
//! written through a mount of one store, published with `kcache push` to a `file://`
//! upstream in the scratch dir (same disk), and read back through a fresh store that
//! `kcache pull`ed it. HTTP upstreams are that same directory served on loopback by
//! `python3 -m http.server`, the kind of static server the README names.
//!
//! f) `remote-fetch`: read a pulled file start to end through a fresh mount (reads follow the
//!    download as it streams in, verified group by group) vs `curl` of the same blob.
//! g) `remote-ttfb`: open() to the first 4 KiB of a cold, larger file; goal 1 s. A raw HTTP
//!    GET of the first 4 KiB of the blob is shown for context.
//! h) `remote-pull`: `kcache pull` of a snapshot with many small files into a fresh store;
//!    goal 10 s.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::mounts;
use crate::own_stores::{median, time_command, Env, OwnStore, Pair};
use crate::workloads::{
    check_interrupted, close_checked, human_size, sync_all_filesystems, Amount, Phase, Prng, MIB,
};

/// Timed passes per side; the median is reported.
const REPEATS: usize = 3;

/// remote-fetch: curl time / kcache time.
const FETCH_GOAL: f64 = 0.8;
/// remote-ttfb: open() to the first `FIRST_BYTES`.
const TTFB_GOAL_SECS: f64 = 1.0;
const FIRST_BYTES: usize = 4096;
/// remote-pull: the whole `kcache pull`.
const PULL_GOAL_SECS: f64 = 10.0;

/// remote-pull's files are spread over this many directories, and are this small.
const PULL_DIRS: usize = 100;
const PULL_FILE_SIZE: usize = 16;

/// Name of the published volume (and so of its tag).
const VOLUME: &str = "default";

/// Generous bounds for helpers, so a hang fails the run instead of stalling it.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const CURL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// f) A `size` file of random bytes, published and served over HTTP. Each pass runs curl
///    (baseline) and a fresh store (pull and mount untimed; the timer covers open and read
///    to the end, which includes the download and its check), in alternating order.
pub fn fetch(env: &Env<'_>, size: usize, seed: u64) -> Result<Vec<Pair>> {
    const NAME: &str = "remote-fetch";
    const FILE: &str = "random.bin";
    let updir = publish(env, NAME, |root| write_random(&root.join(FILE), size, seed))?;
    let blob = single_blob(&updir)?;
    let server = HttpServer::start(&updir, &env.run_dir.path().join(format!("{NAME}-http.log")))?;
    let blob_url = format!("{}/{blob}", server.url());
    let source = format!("{}:{VOLUME}", server.url());
    let curl_out = env.native.join("curl.out");
    let curl_log = env.run_dir.path().join(format!("{NAME}-curl.log"));

    let run_curl = |check: bool| -> Result<f64> {
        sync_all_filesystems();
        let mut curl = Command::new("curl");
        curl.args(["-s", "-S", "-f", "-o"])
            .arg(&curl_out)
            .arg(&blob_url);
        let secs = time_command(&mut curl, &curl_log, CURL_TIMEOUT)?;
        let len = file_len(&curl_out)?;
        ensure!(
            len == size as u64,
            "curl wrote {len} bytes of {blob_url}, expected {size}"
        );
        if check {
            check_random(&curl_out, size, seed).context("checking curl's download")?;
        }
        fs::remove_file(&curl_out).with_context(|| format!("removing {}", curl_out.display()))?;
        Ok(secs)
    };
    let run_kcache = |rep: usize, check: bool| -> Result<f64> {
        let (store, mut mount) = pull_and_mount(env, NAME, rep, &source)?;
        let path = mount.path().join(FILE);
        sync_all_filesystems();
        let start = Instant::now();
        let total = read_to_end(&path)?;
        let secs = start.elapsed().as_secs_f64();
        ensure!(
            total == size as u64,
            "{}: read {total} bytes, expected {size}",
            path.display()
        );
        if check {
            // Local by now, so this re-read checks what was kept, not the network.
            check_random(&path, size, seed)?;
        }
        mount
            .unmount()
            .with_context(|| format!("unmounting {}", store.mountpoint.display()))?;
        remove_store(&store)?;
        Ok(secs)
    };

    let mut curl_secs = Vec::with_capacity(REPEATS);
    let mut kcache_secs = Vec::with_capacity(REPEATS);
    for rep in 0..REPEATS {
        check_interrupted()?;
        let check = rep == 0;
        if rep % 2 == 0 {
            curl_secs.push(run_curl(check)?);
            kcache_secs.push(run_kcache(rep, check)?);
        } else {
            kcache_secs.push(run_kcache(rep, check)?);
            curl_secs.push(run_curl(check)?);
        }
    }
    print_passes(&[("curl", &curl_secs), ("kcache", &kcache_secs)]);
    drop(server);
    remove_dir(&updir)?;

    let label = format!(
        "remote-fetch {} over HTTP: read via pulled mount vs curl",
        human_size(size)
    );
    let phase = |goal: Option<f64>, secs: &[f64]| Phase {
        label: label.clone(),
        goal,
        max_secs: None,
        amount: Amount::Bytes(size as u64),
        secs: median(secs),
        requests: None,
    };
    Ok(vec![Pair {
        baseline: Some(("curl", phase(Some(FETCH_GOAL), &curl_secs))),
        name: "kcache",
        measured: phase(None, &kcache_secs),
    }])
}

/// g) A cold `size` file on an HTTP upstream: each pass pulls into a fresh store, mounts it
///    and times open() plus the read of the first `FIRST_BYTES`. For context, a GET of the
///    blob on a fresh connection, timed until the first `FIRST_BYTES` of the body arrive.
pub fn ttfb(env: &Env<'_>, size: usize, seed: u64) -> Result<Vec<Pair>> {
    const NAME: &str = "remote-ttfb";
    const FILE: &str = "big.bin";
    // One random MiB, repeated: cheap to write, and dedup is per whole file, so the
    // store still holds (and the upstream serves) all `size` bytes.
    let mut block = vec![0u8; MIB];
    Prng::new(seed).fill(&mut block);
    let updir = publish(env, NAME, |root| {
        write_repeated(&root.join(FILE), size, &block)
    })?;
    let blob = single_blob(&updir)?;
    let server = HttpServer::start(&updir, &env.run_dir.path().join(format!("{NAME}-http.log")))?;
    let source = format!("{}:{VOLUME}", server.url());
    let expected = &block[..FIRST_BYTES];

    let mut http_secs = Vec::with_capacity(REPEATS);
    let mut kcache_secs = Vec::with_capacity(REPEATS);
    for rep in 0..REPEATS {
        check_interrupted()?;
        sync_all_filesystems();
        let (secs, first) = http_first_bytes(server.port, &blob, FIRST_BYTES)?;
        ensure!(
            first == expected,
            "GET /{blob}: the first {FIRST_BYTES} bytes are not the file's"
        );
        http_secs.push(secs);

        let (store, mut mount) = pull_and_mount(env, NAME, rep, &source)?;
        let path = mount.path().join(FILE);
        let len = file_len(&path)?;
        ensure!(
            len == size as u64,
            "{}: size {len}, expected {size}",
            path.display()
        );
        sync_all_filesystems();
        let mut buf = vec![0u8; FIRST_BYTES];
        let start = Instant::now();
        let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        f.read_exact(&mut buf)
            .with_context(|| format!("reading the start of {}", path.display()))?;
        let secs = start.elapsed().as_secs_f64();
        drop(f);
        ensure!(
            buf == expected,
            "{}: the first {FIRST_BYTES} bytes are wrong",
            path.display()
        );
        kcache_secs.push(secs);
        mount
            .unmount()
            .with_context(|| format!("unmounting {}", store.mountpoint.display()))?;
        remove_store(&store)?;
    }
    print_passes(&[("http-get", &http_secs), ("kcache", &kcache_secs)]);
    drop(server);
    remove_dir(&updir)?;

    let label = format!(
        "remote-ttfb: open + first 4 KiB of a cold {} file (HTTP)",
        human_size(size)
    );
    let phase = |max_secs: Option<f64>, secs: &[f64]| Phase {
        label: label.clone(),
        goal: None,
        max_secs,
        amount: Amount::Latency,
        secs: median(secs),
        requests: None,
    };
    Ok(vec![Pair {
        baseline: Some(("http-get", phase(None, &http_secs))),
        name: "kcache",
        measured: phase(Some(TTFB_GOAL_SECS), &kcache_secs),
    }])
}

/// h) A snapshot of `count` distinct `PULL_FILE_SIZE`-byte files in `PULL_DIRS` dirs on a
///    `file://` upstream; each pass times `kcache pull` into a fresh store, as a process of
///    its own. The first pass's store is mounted afterwards to check the tree.
pub fn pull(env: &Env<'_>, count: usize, seed: u64) -> Result<Vec<Pair>> {
    const NAME: &str = "remote-pull";
    let updir = publish(env, NAME, |root| write_tiny_files(root, count, seed))?;
    let source = format!("file://{}:{VOLUME}", updir.display());
    let out = env.run_dir.path().join(format!("{NAME}-pull.out"));

    let mut secs = Vec::with_capacity(REPEATS);
    for rep in 0..REPEATS {
        check_interrupted()?;
        let store = OwnStore::create(env.run_dir, &format!("{NAME}-b{rep}"), None)?;
        // Removes what an earlier pass printed, so the check below reads this pull's line.
        let _ = fs::remove_file(&out);
        sync_all_filesystems();
        let mut cmd = Command::new(env.kcache);
        cmd.arg("pull")
            .arg("--store")
            .arg(&store.store)
            .arg(&source);
        secs.push(time_command(&mut cmd, &out, PULL_TIMEOUT)?);
        if rep == 0 {
            let text =
                fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
            println!("  kcache   {}", text.trim_end());
            let mut mount = store.mount(env.kcache)?;
            check_tiny_files(mount.path(), count, seed)?;
            mount
                .unmount()
                .with_context(|| format!("unmounting {}", store.mountpoint.display()))?;
        }
        remove_store(&store)?;
    }
    print_passes(&[("kcache", &secs)]);
    remove_dir(&updir)?;

    Ok(vec![Pair {
        baseline: None,
        name: "kcache",
        measured: Phase {
            label: format!("remote-pull: `kcache pull` of {count} files (file://)"),
            goal: None,
            max_secs: Some(PULL_GOAL_SECS),
            amount: Amount::Files(count as u64),
            secs: median(&secs),
            requests: None,
        },
    }])
}

/// Mounts a fresh store, lets `fill` create files under the mount root, unmounts (which
/// waits for the last commit), pushes the volume to a new `file://` upstream and deletes
/// the store, so only the upstream holds the data. Returns the upstream's directory.
fn publish(env: &Env<'_>, name: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let store = OwnStore::create(env.run_dir, &format!("{name}-a"), None)?;
    let mut mount = store.mount(env.kcache)?;
    let start = Instant::now();
    fill(mount.path()).with_context(|| format!("filling {}", store.store.display()))?;
    mount
        .unmount()
        .with_context(|| format!("unmounting {}", store.mountpoint.display()))?;
    let fill_secs = start.elapsed().as_secs_f64();
    drop(mount);

    let updir = env.run_dir.subdir(&format!("{name}-upstream"))?;
    let out = env.run_dir.path().join(format!("{name}-push.out"));
    let mut cmd = Command::new(env.kcache);
    cmd.arg("push")
        .arg("--store")
        .arg(&store.store)
        .arg("--volume")
        .arg(VOLUME)
        .arg(format!("file://{}", updir.display()));
    let push_secs = time_command(&mut cmd, &out, PUSH_TIMEOUT)?;
    let text = fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    println!(
        "  setup    filled store A through a mount in {fill_secs:.1} s, pushed in \
         {push_secs:.1} s: {}",
        text.trim_end()
    );
    remove_store(&store)?;
    Ok(updir)
}

/// `kcache pull` (untimed) of `source` into a fresh store, then a mount of it.
fn pull_and_mount(
    env: &Env<'_>,
    name: &str,
    rep: usize,
    source: &str,
) -> Result<(OwnStore, mounts::Mount)> {
    let store = OwnStore::create(env.run_dir, &format!("{name}-b{rep}"), None)?;
    let mut cmd = Command::new(env.kcache);
    cmd.arg("pull").arg("--store").arg(&store.store).arg(source);
    let out = env.run_dir.path().join(format!("{name}-pull.out"));
    time_command(&mut cmd, &out, PULL_TIMEOUT)?;
    let mount = store.mount(env.kcache)?;
    Ok((store, mount))
}

/// Deletes an unmounted store and its (empty) mountpoint, to give the disk space back.
fn remove_store(store: &OwnStore) -> Result<()> {
    ensure!(
        !mounts::is_mountpoint(&store.mountpoint),
        "{} is still mounted",
        store.mountpoint.display()
    );
    remove_dir(&store.store)?;
    fs::remove_dir(&store.mountpoint)
        .with_context(|| format!("removing {}", store.mountpoint.display()))
}

fn remove_dir(dir: &Path) -> Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .len())
}

/// `blobs/<2 hex>/<hash>` of the only blob under an upstream's directory.
fn single_blob(updir: &Path) -> Result<String> {
    let blobs = updir.join("blobs");
    let mut found = Vec::new();
    for dir in fs::read_dir(&blobs).with_context(|| format!("listing {}", blobs.display()))? {
        let dir = dir?;
        for f in
            fs::read_dir(dir.path()).with_context(|| format!("listing {}", dir.path().display()))?
        {
            let f = f?;
            found.push(format!(
                "blobs/{}/{}",
                dir.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!(
            "expected one file under {}, found {n}: {found:?}",
            blobs.display()
        ),
    }
}

/// `size` bytes (a whole number of MiB) of the PRNG stream of `seed`.
fn write_random(path: &Path, size: usize, seed: u64) -> Result<()> {
    let mut rng = Prng::new(seed);
    let mut buf = vec![0u8; MIB];
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..size / MIB {
        check_interrupted()?;
        rng.fill(&mut buf);
        f.write_all(&buf)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    close_checked(f, path)
}

/// Checks, untimed, that `path` holds what `write_random` wrote.
fn check_random(path: &Path, size: usize, seed: u64) -> Result<()> {
    let mut rng = Prng::new(seed);
    let mut expected = vec![0u8; MIB];
    let mut buf = vec![0u8; MIB];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for i in 0..size / MIB {
        check_interrupted()?;
        rng.fill(&mut expected);
        f.read_exact(&mut buf)
            .with_context(|| format!("re-reading {} at MiB {i}", path.display()))?;
        ensure!(buf == expected, "{}: wrong data in MiB {i}", path.display());
    }
    ensure!(
        f.read(&mut buf)? == 0,
        "{}: longer than written",
        path.display()
    );
    Ok(())
}

/// `block` written over and over, `size` bytes in all (a whole number of blocks).
fn write_repeated(path: &Path, size: usize, block: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..size / block.len() {
        check_interrupted()?;
        f.write_all(block)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    close_checked(f, path)
}

/// Opens `path` and reads it to the end with 1 MiB reads; returns the bytes read.
fn read_to_end(path: &Path) -> Result<u64> {
    let mut buf = vec![0u8; MIB];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut total = 0u64;
    loop {
        check_interrupted()?;
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn tiny_file_path(root: &Path, i: usize, count: usize) -> PathBuf {
    let per_dir = count.div_ceil(PULL_DIRS);
    root.join(format!("d{:02}", i / per_dir))
        .join(format!("f{i:06}"))
}

/// Distinct for every `i`, so no two files dedup.
fn tiny_file_data(i: usize, seed: u64) -> [u8; PULL_FILE_SIZE] {
    let mut data = [0u8; PULL_FILE_SIZE];
    data[..8].copy_from_slice(&seed.to_le_bytes());
    data[8..].copy_from_slice(&(i as u64).to_le_bytes());
    data
}

fn write_tiny_files(root: &Path, count: usize, seed: u64) -> Result<()> {
    for d in 0..PULL_DIRS {
        let dir = root.join(format!("d{d:02}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for i in 0..count {
        check_interrupted()?;
        let p = tiny_file_path(root, i, count);
        let mut f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        f.write_all(&tiny_file_data(i, seed))
            .with_context(|| format!("writing {}", p.display()))?;
        close_checked(f, &p)?;
    }
    Ok(())
}

/// Checks, untimed, that a pulled tree lists all `count` files and that a sample of them
/// (fetched from the upstream on open) hold the right bytes.
fn check_tiny_files(root: &Path, count: usize, seed: u64) -> Result<()> {
    let mut listed = 0;
    for d in 0..PULL_DIRS {
        let dir = root.join(format!("d{d:02}"));
        listed += fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .count();
    }
    ensure!(
        listed == count,
        "the pulled tree lists {listed} files, expected {count}"
    );
    for i in (0..count)
        .step_by(count.div_ceil(100).max(1))
        .chain([count - 1])
    {
        check_interrupted()?;
        let p = tiny_file_path(root, i, count);
        let got = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        ensure!(
            got == tiny_file_data(i, seed),
            "{}: wrong contents",
            p.display()
        );
    }
    Ok(())
}

/// Prints every pass of each side, as `quota-overhead` does.
fn print_passes(sides: &[(&str, &Vec<f64>)]) {
    for (name, secs) in sides {
        let all: Vec<String> = secs.iter().map(|s| format!("{s:.3}")).collect();
        println!("  {name:<8} passes (s, median reported): {}", all.join(" "));
    }
}

/// Time from connecting to having the first `n` bytes of the body of `GET /path`, on a
/// fresh connection; then hangs up. Returns the seconds and those bytes.
fn http_first_bytes(port: u16, path: &str, n: usize) -> Result<(f64, Vec<u8>)> {
    let start = Instant::now();
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(HTTP_READ_TIMEOUT))?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut got = Vec::with_capacity(n + 1024);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() >= end + 4 + n {
                let secs = start.elapsed().as_secs_f64();
                let head = String::from_utf8_lossy(&got[..end]);
                let status = head.lines().next().unwrap_or_default();
                ensure!(
                    status.split_whitespace().nth(1) == Some("200"),
                    "GET /{path}: {status:?}"
                );
                return Ok((secs, got[end + 4..end + 4 + n].to_vec()));
            }
        }
        let k = s
            .read(&mut chunk)
            .with_context(|| format!("reading the answer to GET /{path}"))?;
        ensure!(
            k > 0,
            "GET /{path}: connection closed after {} bytes",
            got.len()
        );
        got.extend_from_slice(&chunk[..k]);
    }
}

/// `python3 -m http.server` serving a directory on loopback; killed on drop.
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    /// Starts the server on a free port and returns once it accepts connections.
    fn start(dir: &Path, log: &Path) -> Result<Self> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting `python3 -m http.server` (is python3 installed?)")?;
        // From here on the guard owns the child, so every error below stops it.
        let mut server = Self { child, port };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let start = Instant::now();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "`python3 -m http.server {port}` exited ({status}) before accepting \
                     connections{}",
                    mounts::log_tail(log)
                );
            }
            if start.elapsed() > SERVER_START_TIMEOUT {
                bail!(
                    "`python3 -m http.server {port}` accepts no connections after \
                     {SERVER_START_TIMEOUT:?}{}",
                    mounts::log_tail(log)
                );
            }
            check_interrupted()?;
            sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
