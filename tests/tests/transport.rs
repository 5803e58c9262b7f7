//! Which FUSE transport a mount uses, and that both carry the same requests: io_uring when
//! the kernel allows it (`enable_uring`), /dev/fuse otherwise or with `-o noio_uring`, and a
//! clear failure for `-o io_uring` where the kernel does not allow it.

use std::path::Path;

use kcache_tests::*;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets `enable_uring` for the life of the guard, then puts back what was there.
struct UringParam(Option<String>);

impl UringParam {
    fn set(on: bool) -> Option<UringParam> {
        let old = std::fs::read_to_string(PARAM).ok()?;
        std::fs::write(PARAM, if on { "Y" } else { "N" }).ok()?;
        Some(UringParam(Some(old.trim().to_owned())))
    }
}

impl Drop for UringParam {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(PARAM, old);
        }
    }
}

/// Files written through a temp name and renamed, then read back: what a cache does.
fn small_file_workload(root: &Path, n: usize) {
    for d in 0..4 {
        std::fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
    }
    for i in 0..n {
        let tmp = root.join(format!("d{}/.tmp{i}", i % 4));
        std::fs::write(&tmp, pseudo_random(i as u64, 4096 + i)).unwrap();
        std::fs::rename(&tmp, root.join(format!("d{}/f{i}", i % 4))).unwrap();
    }
    for i in 0..n {
        let p = root.join(format!("d{}/f{i}", i % 4));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), (4096 + i) as u64);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            pseudo_random(i as u64, 4096 + i)
        );
    }
}

/// The kcache_fuse_requests_total counters of the mount's metrics endpoint, by op.
fn request_counts(addr: &str) -> std::collections::BTreeMap<String, u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("kcache_fuse_requests_total{op=\""))
        .filter_map(|l| {
            let (op, rest) = l.split_once("\"}")?;
            Some((op.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn mount_on(opts: &[&str]) -> (Mount, String) {
    let addr = free_addr();
    let mut all = vec![format!("metrics={addr}")];
    all.extend(opts.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    (Mount::with_opts(&all).expect("FUSE"), addr)
}

#[test]
fn the_transport_follows_enable_uring_and_the_mount_options() {
    if !fuse_available() {
        return;
    }
    let Some(guard) = UringParam::set(true) else {
        // A kernel without FUSE over io_uring: classic, and -o io_uring refuses to mount.
        assert!(
            std::fs::metadata(PARAM).is_err(),
            "{PARAM} exists but cannot be written (not root?)"
        );
        let (m, _) = mount_on(&[]);
        assert_eq!(m.stats()["transport"], "classic");
        return;
    };

    // Allowed: io_uring by default and with -o io_uring; classic with -o noio_uring. The
    // same workload costs the same requests either way (one dispatch path), and the daemon
    // says which transport it took.
    let mut counts = Vec::new();
    for (opts, want) in [
        (&[][..], "io_uring"),
        (&["io_uring"][..], "io_uring"),
        (&["noio_uring"][..], "classic"),
    ] {
        let (mut m, addr) = mount_on(opts);
        let s = m.stats();
        assert_eq!(s["transport"], want, "{opts:?}: {s}");
        assert!(
            m.log_text()
                .contains(&format!("fuse transport transport=\"{want}\"")),
            "{}",
            m.log_text()
        );
        small_file_workload(&m.mnt, 200);
        // close(2) returns before the kernel's RELEASE reaches the daemon (it is sent in the
        // background), so the last one may still be on its way: wait until every handle
        // opened (open or create) has been released.
        let mut c = request_counts(&addr);
        kcache_tests::wait_until("every open handle is released", 10, || {
            c = request_counts(&addr);
            let n = |op: &str| c.get(op).copied().unwrap_or(0);
            n("release") == n("open") + n("create")
        });
        m.unmount();
        counts.push(c);
    }
    for op in ["create", "rename", "write", "release", "mkdir"] {
        let per: Vec<u64> = counts
            .iter()
            .map(|c| c.get(op).copied().unwrap_or(0))
            .collect();
        assert!(per[0] > 0, "no {op} counted: {counts:?}");
        assert!(
            per.iter().all(|&n| n == per[0]),
            "{op} requests differ between transports: {per:?}"
        );
    }

    // Not allowed: classic by default; -o io_uring fails, naming the parameter.
    drop(guard);
    let _off = UringParam::set(false).unwrap();
    let (m, _) = mount_on(&[]);
    assert_eq!(m.stats()["transport"], "classic");
    small_file_workload(&m.mnt, 20);
    drop(m);
    let dir = tempfile::tempdir().unwrap();
    let (mnt, store) = (dir.path().join("m"), dir.path().join("s"));
    std::fs::create_dir(&mnt).unwrap();
    let (code, out) = kcache(&[
        "mount",
        "--foreground",
        "--store",
        store.to_str().unwrap(),
        "-o",
        "io_uring",
        mnt.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("enable_uring"), "{out}");
}

#[test]
fn many_writes_to_one_file_ask_for_security_capability_once() {
    // With FUSE_HANDLE_KILLPRIV_V2 the kernel checks `security.capability` only on a
    // file's first write after its attributes were refreshed; without it, before every
    // write(2), a round trip each.
    if !fuse_available() {
        return;
    }
    let (m, addr) = mount_on(&[]);
    let before = request_counts(&addr);
    // O_RDWR: written through the page cache, where the kernel makes that check (an
    // O_WRONLY handle is direct and skips it; see the next test).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("many-writes"))
        .unwrap();
    for i in 0..64u64 {
        std::io::Write::write_all(&mut f, &pseudo_random(i, 8192)).unwrap();
    }
    drop(f);
    let after = request_counts(&addr);
    let delta = |op: &str| after.get(op).unwrap_or(&0) - before.get(op).unwrap_or(&0);
    assert_eq!(delta("write"), 64, "{after:?}");
    let checks = delta("getxattr");
    assert!((1..=2).contains(&checks), "getxattr per write: {after:?}");
    let want: Vec<u8> = (0..64u64).flat_map(|i| pseudo_random(i, 8192)).collect();
    assert_eq!(std::fs::read(m.path("many-writes")).unwrap(), want);
}

#[test]
fn write_only_handles_bypass_the_kernels_cached_write_path() {
    // An O_WRONLY handle of a file nobody else has open is direct (FOPEN_DIRECT_IO): its
    // bytes go to the daemon without a copy in the page cache. Seen from here: the cached
    // write path's `security.capability` check before a new file's first write is gone,
    // while O_RDWR files (cached) still get it, and both read back whole.
    if !fuse_available() {
        return;
    }
    let (m, addr) = mount_on(&[]);
    let write = |name: &str, n: u64, rw: bool| {
        let before = request_counts(&addr);
        for i in 0..n {
            let mut f = std::fs::OpenOptions::new()
                .read(rw)
                .write(true)
                .create(true)
                .truncate(true)
                .open(m.path(&format!("{name}{i}")))
                .unwrap();
            std::io::Write::write_all(&mut f, &pseudo_random(i, 8192)).unwrap();
        }
        let after = request_counts(&addr);
        let delta = |op: &str| after.get(op).unwrap_or(&0) - before.get(op).unwrap_or(&0);
        (delta("getxattr"), delta("write"))
    };
    assert_eq!(write("wo", 32, false), (0, 32), "O_WRONLY");
    let (checks, writes) = write("rw", 32, true);
    assert_eq!(
        (checks >= 32, writes),
        (true, 32),
        "O_RDWR: {checks} checks"
    );
    for (name, i) in (0..32).flat_map(|i| [("wo", i), ("rw", i)]) {
        let got = std::fs::read(m.path(&format!("{name}{i}"))).unwrap();
        assert_eq!(got, pseudo_random(i, 8192), "{name}{i}");
    }
}
