//! Containers without a container engine: each "container" is a process in new mount and pid
//! namespaces (one variant also in a user namespace mapping root) that bind-mounts a
//! directory of a kcache mount as its pip cache, as `docker run -v` would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kcache_tests::{hash_file, kcache_ok, venv_python, Mount};

/// A local package index shared by the containers (tests/py/wheel_index.py).
struct Index {
    child: Child,
    url: String,
}

impl Index {
    fn start(py: &Path, dir: &Path) -> Index {
        let (child, url) = kcache_tests::start_announcing(py, "wheel_index.py", dir, "index: ");
        Index { child, url }
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Starts a container: `cache` is bind-mounted at $HOME/.cache/pip, then `script` runs.
fn container(home: &Path, cache: &Path, userns: bool, script: &str) -> Child {
    std::fs::create_dir_all(home.join(".cache/pip")).unwrap();
    let mut cmd = Command::new("unshare");
    if userns {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "bash",
        "-c",
    ])
    .arg(format!(
        "set -eu\nmount --bind \"$CACHE\" \"$HOME/.cache/pip\"\n{script}"
    ))
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("HOME", home)
    .env("CACHE", cache)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd.spawn().expect("unshare")
}

fn finish(c: Child) -> String {
    let out = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "container failed ({}):\n{text}",
        out.status
    );
    text
}

fn pip_install(py: &Path, index: &str, target: &Path) -> String {
    format!(
        "'{}' -m pip install -q --index-url {index} --trusted-host 127.0.0.1 --no-compile \
         --disable-pip-version-check --target '{}' kcache-demo-a kcache-demo-c\necho PIP-OK",
        py.display(),
        target.display()
    )
}

/// Bytes of distinct contents among the regular files under `roots`.
fn distinct_bytes(roots: &[PathBuf]) -> u64 {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && m.len() > 0 {
                seen.insert(hash_file(&p).to_string(), m.len());
            }
        }
    }
    seen.values().sum()
}

#[test]
fn two_containers_install_the_same_wheels_at_once_through_one_directory() {
    let Some(py) = venv_python() else { return };
    let Some(m) = Mount::with_opts(&["allow_other"]) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let index = Index::start(&py, work.path());
    let shared = m.path("pip");
    std::fs::create_dir(&shared).unwrap();
    // One plain container and one in a user namespace mapping root, at the same time.
    let c1 = container(
        &work.path().join("home1"),
        &shared,
        false,
        &pip_install(&py, &index.url, &work.path().join("t1")),
    );
    let c2 = container(
        &work.path().join("home2"),
        &shared,
        true,
        &pip_install(&py, &index.url, &work.path().join("t2")),
    );
    assert!(finish(c1).contains("PIP-OK"));
    assert!(finish(c2).contains("PIP-OK"));
    for t in ["t1", "t2"] {
        assert!(work
            .path()
            .join(t)
            .join("kcache_demo_a/__init__.py")
            .is_file());
    }
    // Everything pip cached is stored once, whichever container wrote it.
    m.settle();
    let s = m.stats();
    let bodies = walk_bodies(&shared.join("http-v2"));
    assert!(bodies >= 3, "pip cached {bodies} bodies");
    assert_eq!(
        s["usage_bytes"].as_u64().unwrap(),
        distinct_bytes(std::slice::from_ref(&shared)),
        "{s}"
    );

    // flock between containers: one holds the lock, the other is refused until it lets go.
    let lock_script = "exec flock \"$HOME/.cache/pip/kc.lock\" -c 'echo HELD; sleep 3'";
    let mut holder = container(&work.path().join("home1"), &shared, false, lock_script);
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "HELD");
    let try_lock = "flock -n \"$HOME/.cache/pip/kc.lock\" true && echo GOT || echo BUSY";
    let out = finish(container(
        &work.path().join("home2"),
        &shared,
        true,
        try_lock,
    ));
    assert!(out.contains("BUSY"), "{out}");
    assert!(holder.wait().unwrap().success());
    let out = finish(container(
        &work.path().join("home2"),
        &shared,
        true,
        try_lock,
    ));
    assert!(out.contains("GOT"), "{out}");
    let _ = std::io::stdout().flush();
}

fn walk_bodies(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "body") {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn containers_on_two_volumes_share_blobs_and_see_nothing_of_each_other() {
    let Some(py) = venv_python() else { return };
    let Some(m) = Mount::with_opts(&["allow_other"]) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let index = Index::start(&py, work.path());
    // Tenant B: another volume of the same store, mounted by the same daemon.
    let mnt_b = work.path().join("mnt-b");
    std::fs::create_dir(&mnt_b).unwrap();
    let store = m.store.to_str().unwrap().to_owned();
    kcache_ok(&[
        "mount",
        "--store",
        &store,
        "--volume",
        "tenant-b",
        "-o",
        "allow_other",
        mnt_b.to_str().unwrap(),
    ]);
    let cache_a = m.path("pip");
    let cache_b = mnt_b.join("pip");
    std::fs::create_dir(&cache_a).unwrap();
    std::fs::create_dir(&cache_b).unwrap();
    let a = container(
        &work.path().join("home-a"),
        &cache_a,
        false,
        &format!(
            "echo secret-a > \"$HOME/.cache/pip/only-a\"\n{}",
            pip_install(&py, &index.url, &work.path().join("ta"))
        ),
    );
    let b = container(
        &work.path().join("home-b"),
        &cache_b,
        false,
        &format!(
            "{}\ntest ! -e \"$HOME/.cache/pip/only-a\" && echo B-SEES-NOTHING-OF-A",
            pip_install(&py, &index.url, &work.path().join("tb"))
        ),
    );
    assert!(finish(a).contains("PIP-OK"));
    let out = finish(b);
    assert!(
        out.contains("PIP-OK") && out.contains("B-SEES-NOTHING-OF-A"),
        "{out}"
    );
    assert!(!cache_b.join("only-a").exists());
    assert!(cache_a.join("only-a").exists());
    // The same wheels in both volumes are stored once.
    m.settle();
    let s = m.stats();
    assert_eq!(
        s["usage_bytes"].as_u64().unwrap(),
        distinct_bytes(&[cache_a.clone(), cache_b.clone()]),
        "{s}"
    );
    assert!(s["dedup_saved_bytes"].as_u64().unwrap() > 0, "{s}");
    // Maintenance on B's path acts on B's volume.
    let du = kcache_ok(&["du", cache_b.to_str().unwrap()]);
    assert!(du.contains("http-v2"), "{du}");
    kcache_ok(&["umount", mnt_b.to_str().unwrap()]);
    assert!(
        cache_a.join("only-a").exists(),
        "unmounting B left A mounted"
    );
}

#[test]
fn a_volume_clone_copies_no_data_and_diverges_independently() {
    let Some(m) = Mount::new() else { return };
    let store = m.store.to_str().unwrap().to_owned();
    std::fs::create_dir(m.path("d")).unwrap();
    for i in 0..1000u64 {
        std::fs::write(
            m.path(&format!("d/f{i:04}")),
            kcache_tests::pseudo_random(i, 2048),
        )
        .unwrap();
    }
    m.settle();
    let before = m.stats();
    let out = kcache_ok(&["volume", "--store", &store, "clone", "default", "copy"]);
    assert!(out.contains("cloned volume default to copy"), "{out}");
    let after = m.stats();
    // Metadata only: not one more byte or blob stored.
    assert_eq!(before["usage_bytes"], after["usage_bytes"]);
    assert_eq!(before["blobs"], after["blobs"]);
    assert_eq!(after["files"].as_u64().unwrap(), 2000);

    let work = tempfile::tempdir().unwrap();
    // Import into the clone while only the original is mounted: the running daemon mounts
    // the clone for the import and unmounts it again.
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("imported"), b"into the copy").unwrap();
    let out = kcache_ok(&[
        "import",
        "--store",
        &store,
        "--volume",
        "copy",
        src.to_str().unwrap(),
        "/imp",
    ]);
    assert!(out.contains("imported 1 files"), "{out}");
    assert!(
        !m.path("imp").exists(),
        "the import went to the wrong volume"
    );
    let mnt_c = work.path().join("copy");
    std::fs::create_dir(&mnt_c).unwrap();
    kcache_ok(&[
        "mount",
        "--store",
        &store,
        "--volume",
        "copy",
        mnt_c.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(mnt_c.join("imp/imported")).unwrap(),
        b"into the copy"
    );
    for i in [0u64, 500, 999] {
        assert_eq!(
            std::fs::read(mnt_c.join(format!("d/f{i:04}"))).unwrap(),
            kcache_tests::pseudo_random(i, 2048)
        );
    }
    // Changes on either side stay there.
    std::fs::write(mnt_c.join("d/f0000"), b"changed in the copy").unwrap();
    std::fs::remove_file(mnt_c.join("d/f0001")).unwrap();
    std::fs::write(m.path("d/f0002"), b"changed in the original").unwrap();
    assert_eq!(
        std::fs::read(m.path("d/f0000")).unwrap(),
        kcache_tests::pseudo_random(0, 2048)
    );
    assert!(m.path("d/f0001").exists());
    assert_eq!(
        std::fs::read(mnt_c.join("d/f0002")).unwrap(),
        kcache_tests::pseudo_random(2, 2048)
    );
    assert_eq!(std::fs::read_dir(m.path("d")).unwrap().count(), 1000);
    assert_eq!(std::fs::read_dir(mnt_c.join("d")).unwrap().count(), 999);
    kcache_ok(&["umount", mnt_c.to_str().unwrap()]);
    let (code, out) =
        kcache_tests::kcache(&["volume", "--store", &store, "rm", "--yes", "default"]);
    assert_eq!(code, 1, "a mounted volume must not be removed: {out}");
    kcache_ok(&["volume", "--store", &store, "rm", "--yes", "copy"]);
}

#[test]
fn with_allow_other_users_get_their_own_files_and_mode_bits_hold() {
    let Some(mut m) = Mount::with_opts(&["allow_other"]) else {
        return;
    };
    std::fs::set_permissions(&m.mnt, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let mnt = m.mnt.clone();
    let as_user = |uid: u32, script: &str| -> (bool, String) {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .current_dir(&mnt)
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
    };
    let (ok, out) = as_user(
        1000,
        "umask 077 && mkdir u1000 && echo mine > u1000/private && chmod 755 u1000 && cat u1000/private && stat -c '%u:%g %a' u1000/private",
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("mine") && out.contains("1000:1000 600"),
        "{out}"
    );
    let (ok, out) = as_user(1001, "cat u1000/private");
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, out) = as_user(1001, "echo x > u1000/intruder");
    assert!(!ok && out.contains("Permission denied"), "{out}");
    // The owner is recorded in the store: it survives a remount.
    m.remount();
    let md = std::fs::metadata(m.path("u1000/private")).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&md),
            std::os::unix::fs::MetadataExt::mode(&md) & 0o777
        ),
        (1000, 0o600)
    );
    let (ok, out) = as_user(1000, "cat u1000/private");
    assert!(ok && out.contains("mine"), "{out}");
}
