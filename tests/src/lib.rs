//! Helpers for integration tests that mount real kcache filesystems: a `Mount` fixture that
//! runs the real `kcache` binary and unmounts on drop, plus small file and process utilities.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (parent of this crate).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The `kcache` binary under test: $KCACHE_BIN, else the one cargo built next to this test.
pub fn kcache_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KCACHE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/kcache
    let p = exe.parent().unwrap().parent().unwrap().join("kcache");
    assert!(
        p.exists(),
        "kcache binary not found at {} (build it first: cargo build --workspace)",
        p.display()
    );
    p
}

/// Whether FUSE tests can run here. With REQUIRE_FUSE=1 (CI) a missing /dev/fuse fails.
pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    if !ok {
        assert!(
            std::env::var_os("REQUIRE_FUSE").is_none(),
            "REQUIRE_FUSE is set but /dev/fuse is missing or we are not root"
        );
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}

/// The Python of the pinned test venv (.venv-test), or None (skip) outside CI.
pub fn venv_python() -> Option<PathBuf> {
    let p = std::env::var_os("KCACHE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv-test/bin/python"));
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("REQUIRE_FUSE").is_none(),
        "test venv {} is missing (create it: python3 -m venv .venv-test && .venv-test/bin/pip install -r tests/py/requirements.txt)",
        p.display()
    );
    eprintln!("skipping: no test venv at {}", p.display());
    None
}

/// The most namespace changes a crash of the daemon may lose (kcache_store's group-commit
/// interval, with room for the commit itself).
pub const GROUP_COMMIT_BOUND: Duration = Duration::from_millis(100);

/// A running `kcache mount --foreground` over a temporary store.
pub struct Mount {
    pub store: PathBuf,
    pub mnt: PathBuf,
    pub opts: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    // Last: the directory outlives the mount.
    _dir: tempfile::TempDir,
}

fn is_mounted(mnt: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_string_lossy();
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(&want) && l.contains(" - fuse.kcache "))
}

impl Mount {
    /// Mounts a fresh store; None when FUSE is unavailable (and not required).
    pub fn new() -> Option<Mount> {
        Mount::with_opts(&[])
    }

    pub fn with_opts(opts: &[&str]) -> Option<Mount> {
        Mount::build(opts, None)
    }

    /// A mount whose store lives on a tmpfs of `bytes`, to fill the store's disk.
    pub fn on_small_disk(bytes: u64) -> Option<Mount> {
        Mount::build(&[], Some(bytes))
    }

    fn build(opts: &[&str], disk: Option<u64>) -> Option<Mount> {
        if !fuse_available() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("kcache-test")
            .tempdir()
            .unwrap();
        let store = dir.path().join("store");
        if let Some(bytes) = disk {
            std::fs::create_dir(&store).unwrap();
            mount_tmpfs(&store, bytes);
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut m = Mount {
            log: dir.path().join("daemon.log"),
            store,
            mnt,
            opts: opts.iter().map(|s| s.to_string()).collect(),
            child: None,
            _dir: dir,
        };
        m.start();
        Some(m)
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(kcache_bin());
        cmd.arg("mount")
            .arg("--foreground")
            .arg("--store")
            .arg(&self.store);
        for o in &self.opts {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // A dead mount left by a crash stays listed until the new daemon detaches it (and mount
        // ids get reused), so wait for the daemon's own "mounted" log line.
        let mounted_lines = |s: &Mount| s.log_text().matches("kcache::daemon: mounted").count();
        let before = mounted_lines(self);
        let mut child = cmd.spawn().expect("spawning kcache");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(is_mounted(&self.mnt) && mounted_lines(self) > before) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("kcache exited ({st}) before mounting:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mount timed out:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Unmounts cleanly with `kcache umount` and waits for the daemon to exit.
    pub fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut ok = false;
        for _ in 0..100 {
            let st = Command::new(kcache_bin())
                .arg("umount")
                .arg(&self.mnt)
                .status()
                .unwrap();
            if st.success() {
                ok = true;
                break;
            }
            // Busy right after a test closed its files: the kernel may still be releasing them.
            std::thread::sleep(Duration::from_millis(50));
        }
        if !ok {
            lazy_umount(&self.mnt);
        }
        let st = child.wait().unwrap();
        assert!(ok, "kcache umount failed:\n{}", self.log_text());
        assert!(
            st.success(),
            "daemon exited with {st}:\n{}",
            self.log_text()
        );
    }

    /// Kills the daemon with SIGKILL, leaving a dead mount behind, as a crash would. It first
    /// lets the group-commit bound pass (twice over), since the crash contract promises what
    /// was done before it: what callers check afterwards is what the contract keeps.
    pub fn kill9(&mut self) {
        std::thread::sleep(2 * GROUP_COMMIT_BOUND);
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGKILL at once, without waiting out the group-commit bound: for tests of the bound.
    pub fn kill9_now(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.start();
    }

    /// Mounts again after a crash: `kcache mount` must recover the dead mountpoint itself.
    pub fn restart_after_crash(&mut self) {
        assert!(self.child.is_none());
        self.start();
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(kcache_bin())
            .args(["stats", "--json", "--store"])
            .arg(&self.store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs `kcache verify` (the store must be unmounted); returns (success, stdout).
    pub fn verify(&self) -> (bool, String) {
        let out = Command::new(kcache_bin())
            .args(["verify", "--store"])
            .arg(&self.store)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Waits until every closed file is committed and visible to other processes: the kernel
    /// sends release asynchronously
    /// after close(), and commits reach the database in groups (see `GROUP_COMMIT_BOUND`).
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.staging_files() > 0 {
            assert!(Instant::now() < deadline, "staged files never committed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // And past the group-commit bound, so other processes (`kcache serve`, a reader of
        // the database) see the commits too.
        std::thread::sleep(GROUP_COMMIT_BOUND);
    }

    /// Files left in the store's staging directory.
    pub fn staging_files(&self) -> usize {
        std::fs::read_dir(self.store.join("staging"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Mounts a tmpfs of `bytes` at `at` (an existing directory): a small disk to fill.
pub fn mount_tmpfs(at: &Path, bytes: u64) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "kcache-test"])
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs at {}", at.display());
}

/// Pids of `kcache mount` daemons serving `mp`, found through /proc.
pub fn daemon_pids(mp: &Path) -> Vec<i32> {
    let want = mp.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.contains(&&b"--foreground"[..]) && args.contains(&want.as_bytes())
        })
        .collect()
}

pub fn lazy_umount(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.drop_mount();
        // A tmpfs under the store (on_small_disk) goes after the daemon has let go of it.
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if text
            .lines()
            .any(|l| l.split(' ').nth(4) == self.store.to_str())
        {
            lazy_umount(&self.store);
        }
    }
}

impl Mount {
    fn drop_mount(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new(kcache_bin())
                .arg("umount")
                .arg(&self.mnt)
                .status();
            if is_mounted(&self.mnt) {
                lazy_umount(&self.mnt);
            }
            let _ = child.kill();
            let _ = child.wait();
        } else if is_mounted(&self.mnt) {
            lazy_umount(&self.mnt);
        }
    }
}

/// BLAKE3 of a file's content.
pub fn hash_file(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize()
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a Python snippet with the system python3 (stdlib only); panics with its output on
/// failure. Returns stdout.
pub fn python(code: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `n` copies of a Python snippet at once, each with arguments `arg` and its index;
/// panics if any fails. Returns their stdouts in index order.
pub fn python_workers(code: &str, arg: &Path, n: usize) -> Vec<String> {
    let children: Vec<_> = (0..n)
        .map(|i| {
            Command::new("python3")
                .arg("-c")
                .arg(code)
                .arg(arg)
                .arg(i.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "worker failed ({})", out.status);
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// Runs the kcache binary; returns its exit code and stdout+stderr.
pub fn kcache(args: &[&str]) -> (i32, String) {
    kcache_env(args, &[])
}

/// `kcache` with variables added to its environment (a daemon it starts inherits them).
pub fn kcache_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = std::process::Command::new(kcache_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running kcache");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs the kcache binary and requires success; returns its output.
pub fn kcache_ok(args: &[&str]) -> String {
    let (code, out) = kcache(args);
    assert_eq!(code, 0, "kcache {args:?} failed:\n{out}");
    out
}

/// Starts a helper process (`python` running one of `tests/py/`'s servers) that prints
/// `PREFIX VALUE` as its first line once ready, and runs until its stdin closes. Returns the
/// child (stdin and stdout piped) and VALUE.
pub fn start_announcing(
    python: &Path,
    script: &str,
    arg: &Path,
    prefix: &str,
) -> (std::process::Child, String) {
    start_announcing_with(python, script, &[arg.as_os_str()], prefix)
}

/// `start_announcing` with any arguments.
pub fn start_announcing_with(
    python: &Path,
    script: &str,
    args: &[&std::ffi::OsStr],
    prefix: &str,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(python)
        .arg(workspace().join("tests/py").join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting a test server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let value = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{script} did not start: {line:?}"))
        .trim()
        .to_owned();
    (child, value)
}

/// Polls `cond` until it holds, failing the test with `what` once `secs` have passed.
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
