//! Real tools on a real mount: pip and huggingface_hub using it as their cache, the pjdfstest
//! POSIX conformance suite and the fsx data-integrity exerciser, in both I/O modes.

use std::path::Path;
use std::process::Command;

use kcache_tests::{venv_python, workspace, Mount};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawning test tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn pip_installs_twice_and_the_second_run_uses_the_cache() {
    let Some(py) = venv_python() else { return };
    let Some(m) = Mount::new() else { return };
    let cache = m.path("pip");
    std::fs::create_dir(&cache).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/pip_cache_check.py"))
        .arg(&cache)
        .arg(work.path()));
    assert!(out.contains("pip cache check: ok"), "{out}");
}

#[test]
fn huggingface_hub_cache_with_symlinks_locks_and_dedup() {
    let Some(py) = venv_python() else { return };
    let Some(mut m) = Mount::new() else { return };
    let cache = m.path("hf");
    std::fs::create_dir(&cache).unwrap();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/hf_check.py"))
        .arg(&cache));
    assert!(out.contains("hf check: ok"), "{out}");
    let shared: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("shared-bytes: "))
        .expect("shared-bytes line")
        .trim()
        .parse()
        .unwrap();
    let blobs: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("shared-blob: "))
        .collect();
    assert_eq!(blobs.len(), 2, "{out}");
    assert_ne!(blobs[0], blobs[1]);
    // The byte-identical file of two repos is stored once.
    m.settle();
    let s = m.stats();
    assert!(s["dedup_saved_bytes"].as_u64().unwrap() >= shared, "{s}");
    // Everything is still there, offline, after a remount.
    m.remount();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/hf_check.py"))
        .arg(&cache)
        .arg("--offline-only"));
    assert!(out.contains("hf check: ok"), "{out}");
}

/// The runner scripts install their tool on first use and write to one output directory, so
/// the two conformance runs take turns.
static CONFORMANCE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn conformance(opts: &[&str]) {
    let _turn = CONFORMANCE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(m) = Mount::with_opts(opts) else {
        return;
    };
    // pjdfstest switches to unprivileged users, who must be able to enter the mount.
    std::fs::set_permissions(&m.mnt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ci = workspace().join(".ci");
    // A generous pause between timestamp checks: a loaded CI machine must not turn a
    // timestamp comparison into a coin toss.
    let out = run(Command::new("bash")
        .env("PJDFSTEST_NAPTIME", "0.1")
        .arg(ci.join("pjdfstest.sh"))
        .arg(&m.mnt)
        .arg(workspace().join("tests/pjdfstest-expected-failures.txt")));
    assert!(out.contains("pjdfstest: OK"), "{out}");
    let out = run(Command::new("bash").arg(ci.join("fsx.sh")).arg(&m.mnt));
    assert!(out.contains("fsx: OK"), "{out}");
    assert!(Path::new(&m.mnt).exists());
}

#[test]
fn pjdfstest_and_fsx_passthrough() {
    conformance(&["allow_other"]);
}

#[test]
fn pjdfstest_and_fsx_daemon_io() {
    conformance(&["allow_other", "nopassthrough"]);
}
