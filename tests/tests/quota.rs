//! Quota, LRU eviction, pins, a full disk, and the maintenance commands, on real mounts.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use kcache_tests::{kcache, kcache_ok, pseudo_random, Mount};

const MIB: u64 = 1 << 20;

fn usage(m: &Mount) -> u64 {
    m.stats()["usage_bytes"].as_u64().unwrap()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn enoent(p: &Path) -> bool {
    fs::metadata(p).is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT))
}

/// Sizes between 256 KiB and 2 MiB, from a fixed seed.
fn size_of(i: u64) -> usize {
    let r = u64::from_le_bytes(pseudo_random(7000 + i, 8).try_into().unwrap());
    (256 << 10) + (r % (7 << 18)) as usize
}

#[test]
fn quota_holds_while_writing_five_times_it_and_spares_open_and_pinned_files() {
    let quota = 8 * MIB;
    let Some(m) = Mount::with_opts(&["quota=8M"]) else {
        return;
    };
    let mnt = m.mnt.to_str().unwrap().to_owned();
    // A pinned tree (under half the quota) and a file held open: both older than everything
    // else, neither may go.
    fs::create_dir_all(m.path("pinned/sub")).unwrap();
    fs::write(m.path("pinned/a"), pseudo_random(1, 768 << 10)).unwrap();
    fs::write(m.path("pinned/sub/b"), pseudo_random(2, 768 << 10)).unwrap();
    let out = kcache_ok(&["pin", m.path("pinned").to_str().unwrap()]);
    assert!(out.contains("1.5 MiB pinned"), "{out}");
    fs::write(m.path("held"), pseudo_random(3, MIB as usize)).unwrap();
    m.settle();
    let held = fs::File::open(m.path("held")).unwrap();

    let largest = 2 * MIB;
    let mut written = 0u64;
    let mut n = 0u64;
    while written < 5 * quota {
        let data = pseudo_random(n, size_of(n));
        fs::write(m.path(&format!("f{n:03}")), &data).unwrap();
        written += data.len() as u64;
        m.settle();
        let used = usage(&m);
        assert!(
            used <= quota + largest,
            "stored {used} bytes after file {n} (quota {quota})"
        );
        n += 1;
    }
    wait_until("usage is within the quota", || usage(&m) <= quota);
    // The newest files survive whole; evicted ones are gone from the kernel's caches too.
    for i in n - 2..n {
        assert_eq!(
            fs::read(m.path(&format!("f{i:03}"))).unwrap(),
            pseudo_random(i, size_of(i))
        );
    }
    assert!(enoent(&m.path("f000")));
    let mut names: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for name in names.iter().filter(|n| n.starts_with('f')) {
        let i: u64 = name[1..].parse().unwrap();
        assert_eq!(
            fs::read(m.path(name)).unwrap(),
            pseudo_random(i, size_of(i)),
            "{name} must be whole"
        );
    }
    assert!(names.contains(&"held".into()), "an open file was evicted");
    assert_eq!(
        fs::read(m.path("held")).unwrap(),
        pseudo_random(3, MIB as usize)
    );
    assert_eq!(
        fs::read(m.path("pinned/sub/b")).unwrap(),
        pseudo_random(2, 768 << 10)
    );
    let s = m.stats();
    assert!(s["evictions"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["pinned_bytes"].as_u64().unwrap(), 1536 << 10, "{s}");

    // Pinning more than half the quota is refused with a clear error.
    let (code, out) = kcache(&["pin", &mnt]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("more than half the quota"), "{out}");

    // The quota changes on the live mount; pinned and open files still stay.
    let out = kcache_ok(&["quota", &mnt, "3M", "--low-watermark", "80"]);
    assert!(out.contains("quota 3.0 MiB"), "{out}");
    wait_until("usage is within the new quota", || usage(&m) <= 3 * MIB);
    assert!(m.path("pinned/a").exists() && m.path("held").exists());
    let s = m.stats();
    assert_eq!(s["quota_bytes"].as_u64(), Some(3 * MIB), "{s}");

    // A file larger than the quota can never be stored: its writer gets ENOSPC. (What it
    // wrote before that is committed at close, as after any failed write, and evicted.)
    let err = fs::write(m.path("huge"), pseudo_random(9, 4 * MIB as usize)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    m.settle();
    wait_until("usage is back within the quota", || usage(&m) <= 3 * MIB);
    assert_eq!(
        fs::read(m.path("held")).unwrap(),
        pseudo_random(3, MIB as usize)
    );
    assert!(m.path("pinned/sub/b").exists());
    drop(held);
}

#[test]
fn lru_order_survives_a_crash_and_decides_what_goes() {
    let Some(mut m) = Mount::new() else { return };
    let mnt = m.mnt.to_str().unwrap().to_owned();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        fs::write(m.path(name), pseudo_random(100 + i as u64, MIB as usize)).unwrap();
        m.settle();
    }
    // The daemon writes its batch of accesses (and the open counter with it) about once a
    // second; read the database itself, as a crash would leave it.
    let db = m.store.join("kcache.db");
    let opens = || -> u64 {
        kcache_tests::python(
            "import sqlite3,sys\nc=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro',uri=True)\n\
             r=c.execute(\"SELECT value FROM counters WHERE name='opens'\").fetchone()\n\
             print(r[0] if r else 0)",
            &[db.to_str().unwrap()],
        )
        .trim()
        .parse()
        .unwrap()
    };
    let before = opens();
    // Reading a makes it the most recently used; b is now the oldest.
    assert_eq!(
        fs::read(m.path("a")).unwrap(),
        pseudo_random(100, MIB as usize)
    );
    wait_until("the access batch is written", || opens() > before);
    m.kill9();
    m.restart_after_crash();
    let out = kcache_ok(&["evict", &mnt, "--to", "2M"]);
    assert!(out.contains("evicted 1 blobs"), "{out}");
    assert!(enoent(&m.path("b")), "b was the least recently used");
    assert_eq!(
        fs::read(m.path("c")).unwrap(),
        pseudo_random(102, MIB as usize)
    );
    assert_eq!(
        fs::read(m.path("a")).unwrap(),
        pseudo_random(100, MIB as usize)
    );
    // The same on an unmounted store: c was read before a, so c goes next.
    m.unmount();
    let store = m.store.to_str().unwrap().to_owned();
    let out = kcache_ok(&["evict", "--store", &store, "--to", "1M"]);
    assert!(out.contains("evicted 1 blobs"), "{out}");
    m.remount();
    assert!(enoent(&m.path("c")));
    assert_eq!(
        fs::read(m.path("a")).unwrap(),
        pseudo_random(100, MIB as usize)
    );
}

#[test]
fn full_disk_evicts_then_gives_enospc_and_every_file_stays_whole() {
    let Some(mut m) = Mount::on_small_disk(32 << 20) else {
        return;
    };
    for i in 0..10u64 {
        fs::write(m.path(&format!("old{i}")), pseudo_random(i, MIB as usize)).unwrap();
        m.settle();
    }
    fs::write(m.path("pinned"), pseudo_random(20, MIB as usize)).unwrap();
    fs::write(m.path("held"), pseudo_random(21, MIB as usize)).unwrap();
    m.settle();
    kcache_ok(&["pin", m.path("pinned").to_str().unwrap()]);
    let held = fs::File::open(m.path("held")).unwrap();
    let free_at_start = nix_free(&m.store);

    // Fill the disk through the mount: old files are evicted to make room, and only once
    // nothing is left to evict does the writer get ENOSPC.
    let mut f = fs::File::create(m.path("filler")).unwrap();
    let chunk = pseudo_random(30, MIB as usize);
    let mut err = None;
    let mut wrote = 0u64;
    for _ in 0..64 {
        use std::io::Write;
        match f.write_all(&chunk) {
            Ok(()) => wrote += MIB,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err
        .or_else(|| f.sync_all().err())
        .expect("a 64 MiB write to a 32 MiB disk must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(
        wrote > free_at_start + 4 * MIB,
        "wrote {wrote} bytes with {free_at_start} free: eviction did not make room"
    );
    drop(f);
    m.settle();
    let s = m.stats();
    assert!(s["evictions"].as_u64().unwrap() >= 8, "{s}");
    // Every name left is whole; the pinned and the open file are still there.
    for i in 0..10u64 {
        let p = m.path(&format!("old{i}"));
        if !enoent(&p) {
            assert_eq!(fs::read(&p).unwrap(), pseudo_random(i, MIB as usize));
        }
    }
    assert_eq!(
        fs::read(m.path("pinned")).unwrap(),
        pseudo_random(20, MIB as usize)
    );
    assert_eq!(
        fs::read(m.path("held")).unwrap(),
        pseudo_random(21, MIB as usize)
    );
    drop(held);
    // Deleting works on the full disk (the daemon keeps headroom for its database), and
    // the mount works again afterwards.
    fs::remove_file(m.path("filler")).unwrap();
    fs::write(m.path("after"), b"space again").unwrap();
    m.remount();
    assert_eq!(fs::read(m.path("after")).unwrap(), b"space again");
    assert_eq!(
        fs::read(m.path("pinned")).unwrap(),
        pseudo_random(20, MIB as usize)
    );
    m.unmount();
    let (ok, out) = m.verify();
    assert!(ok, "{out}");
}

/// A disk filled behind kcache's back (another process on the store's disk) can make the
/// database's group commit fail, and SQLite then rolls the whole group back: changes the
/// mount had acknowledged are gone, as in a crash. The daemon must not go on building on
/// them: it stops taking changes (EIO, `kcache stats` says HALTED and why) while reads go on,
/// and a remount recovers, with every file written before whole.
#[test]
fn a_group_commit_the_full_disk_rolls_back_halts_changes_until_a_remount() {
    let Some(mut m) = Mount::on_small_disk(16 << 20) else {
        return;
    };
    for i in 0..20u64 {
        fs::write(m.path(&format!("before{i}")), pseudo_random(i, 3000)).unwrap();
    }
    m.settle();
    // Fill the store's disk from outside, leaving 8 KiB: the next group's write-ahead log
    // frames do not fit.
    let filler = m.store.join("filler");
    let free = nix_free(&m.store);
    fs::write(&filler, vec![0u8; (free - 8192) as usize]).unwrap();
    let mut first_err = None;
    for i in 0..5000 {
        if let Err(e) = fs::create_dir(m.path(&format!("d{i}"))) {
            first_err = Some(e);
            break;
        }
    }
    let e = first_err.expect("5,000 mkdirs fit in 8 KiB of database log");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOSPC)),
        "{e}"
    );
    // The group commit that failed may come a little after the first refused change.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let halted = loop {
        let s = m.stats();
        if let Some(h) = s.get("halted").and_then(|h| h.as_str()) {
            break h.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "never halted: {s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(halted.contains("remount"), "{halted}");
    // Changes are refused even with room again, until a remount; reads go on.
    fs::remove_file(&filler).unwrap();
    let e = fs::create_dir(m.path("refused")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    for i in 0..20u64 {
        assert_eq!(
            fs::read(m.path(&format!("before{i}"))).unwrap(),
            pseudo_random(i, 3000)
        );
    }
    // A write to an existing file after the halt is acknowledged by the kernel; its commit
    // is refused, so it stays staged, and the remount (or a reboot) still keeps it.
    {
        use std::io::{Seek, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.path("before0"))
            .unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(b"written after the halt").unwrap();
    }
    // Past the access-time flush (every second), which must not report the halt again.
    std::thread::sleep(Duration::from_millis(1500));
    let log = m.log_text();
    assert_eq!(
        log.matches("the store takes no more changes").count(),
        1,
        "one line for the halt, none per refused change:\n{log}"
    );
    m.remount();
    assert!(m.stats().get("halted").is_none());
    assert!(
        m.log_text()
            .contains("content that could not be committed is kept"),
        "{}",
        m.log_text()
    );
    fs::write(m.path("after"), b"writable again").unwrap();
    let mut want = pseudo_random(0, 3000);
    want[..22].copy_from_slice(b"written after the halt");
    assert_eq!(fs::read(m.path("before0")).unwrap(), want);
    for i in 1..20u64 {
        assert_eq!(
            fs::read(m.path(&format!("before{i}"))).unwrap(),
            pseudo_random(i, 3000)
        );
    }
    m.unmount();
    let (ok, out) = m.verify();
    assert!(ok, "{out}");
}

/// A daemonized mount logs to `<store>/kcache.log`, so a full store disk also fails its log
/// writes. tracing-subscriber reports a failed write with `eprintln!`, which panics when
/// stderr (the same full file) cannot be written: the panic ran through the request handler's
/// own "panicked" log line and killed the ring thread, and every request on its queue hung
/// for good. A log line that cannot be written must be dropped, nothing else.
#[test]
fn a_daemon_whose_log_is_on_a_full_disk_keeps_answering() {
    if !kcache_tests::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&store).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    kcache_tests::mount_tmpfs(&store, 16 << 20);
    struct Cleanup(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = kcache(&["umount", self.1.to_str().unwrap()]);
            kcache_tests::lazy_umount(&self.1);
            kcache_tests::lazy_umount(&self.0);
        }
    }
    let _cleanup = Cleanup(store.clone(), mnt.clone());
    // Debug level: every open and release logs a line.
    let (code, out) = kcache_tests::kcache_env(
        &[
            "mount",
            "--store",
            store.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
        &[("KCACHE_LOG", "debug")],
    );
    assert_eq!(code, 0, "{out}");
    for i in 0..20u64 {
        fs::write(mnt.join(format!("f{i}")), pseudo_random(i, 5000)).unwrap();
    }
    // Committed before the disk fills (else the full disk rolls their group back).
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_dir(store.join("staging")).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "files never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(3 * kcache_tests::GROUP_COMMIT_BOUND);
    // Fill the disk to the last byte.
    let mut filler = fs::File::create(store.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        match std::io::Write::write(&mut filler, &chunk) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    while std::io::Write::write(&mut filler, &[0u8]).is_ok_and(|n| n == 1) {}
    // Read every file a few times on another thread: a hung request must fail the test,
    // not hang it.
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = mnt.clone();
    std::thread::spawn(move || {
        for _ in 0..5 {
            for i in 0..20u64 {
                let got = fs::read(m2.join(format!("f{i}")));
                let ok = got.as_ref().is_ok_and(|b| *b == pseudo_random(i, 5000));
                if !ok {
                    let _ = tx.send(Err(format!("f{i}: {:?}", got.map(|b| b.len()))));
                    return;
                }
            }
        }
        let _ = tx.send(Ok(()));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("a read failed with the log on a full disk: {e}"),
        Err(_) => {
            // Unblock the stuck reader before failing.
            for p in kcache_tests::daemon_pids(&mnt) {
                // SAFETY: plain kill(2) of the daemon this test started.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            panic!("reads hung with the daemon's log on a full disk");
        }
    }
    drop(filler);
    fs::remove_file(store.join("filler")).unwrap();
    kcache_ok(&["umount", mnt.to_str().unwrap()]);
}

/// Free bytes on the filesystem holding `p`.
fn nix_free(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: statvfs fills the zeroed struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail * s.f_frsize
}

#[test]
fn maintenance_commands_work_live_and_on_an_unmounted_store() {
    let Some(mut m) = Mount::new() else { return };
    let store = m.store.to_str().unwrap().to_owned();
    fs::create_dir_all(m.path("pip/http")).unwrap();
    fs::create_dir_all(m.path("hf/blobs")).unwrap();
    fs::write(m.path("pip/http/x"), pseudo_random(1, 300 << 10)).unwrap();
    fs::write(m.path("hf/blobs/y"), pseudo_random(2, 700 << 10)).unwrap();
    // Same content twice: stored once, its share split between the two trees.
    fs::write(m.path("hf/blobs/z"), pseudo_random(1, 300 << 10)).unwrap();
    m.settle();

    let du: serde_json::Value =
        serde_json::from_str(&kcache_ok(&["du", "--json", m.mnt.to_str().unwrap()])).unwrap();
    let row = |p: &str| {
        du.as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == p)
            .unwrap_or_else(|| panic!("no du row {p}: {du}"))
            .clone()
    };
    assert_eq!(row("")["logical_bytes"], 1300 << 10);
    assert_eq!(row("")["stored_bytes"], 1000 << 10);
    assert_eq!(row("hf")["logical_bytes"], 1000 << 10);
    assert_eq!(row("hf")["stored_bytes"], 850 << 10);
    assert_eq!(row("pip")["stored_bytes"], 150 << 10);

    let out = kcache_ok(&["pins", m.mnt.to_str().unwrap()]);
    assert!(out.contains("pinned: 0 B"), "{out}");
    kcache_ok(&["pin", m.path("hf").to_str().unwrap()]);
    let out = kcache_ok(&["pins", m.mnt.to_str().unwrap()]);
    assert!(out.contains("/hf"), "{out}");

    // clean by age: nothing is older than an hour; everything unpinned is older than 0 s.
    let out = kcache_ok(&["clean", m.mnt.to_str().unwrap(), "--older-than", "1h"]);
    assert!(out.contains("evicted 0 blobs"), "{out}");
    std::thread::sleep(Duration::from_millis(1100));
    let out = kcache_ok(&["clean", m.mnt.to_str().unwrap(), "--older-than", "1s"]);
    // pip/http/x shares its blob with the pinned hf/blobs/z, so it stays too.
    assert!(out.contains("evicted 0 blobs"), "{out}");
    kcache_ok(&["unpin", m.path("hf").to_str().unwrap()]);
    let out = kcache_ok(&["clean", m.mnt.to_str().unwrap(), "--older-than", "1s"]);
    assert!(out.contains("evicted 2 blobs"), "{out}");
    assert!(enoent(&m.path("hf/blobs/y")) && enoent(&m.path("pip/http/x")));

    // clear needs --yes without a terminal, then empties the tree (the directory stays).
    fs::write(m.path("pip/http/new"), b"new").unwrap();
    let (code, out) = kcache(&["clear", m.path("pip").to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("without --yes"), "{out}");
    assert!(m.path("pip/http/new").exists());
    let out = kcache_ok(&["clear", "--yes", m.path("pip").to_str().unwrap()]);
    assert!(out.contains("removed 2 names"), "{out}");
    assert!(m.path("pip").is_dir() && enoent(&m.path("pip/http")));
    kcache_ok(&["gc", m.mnt.to_str().unwrap()]);

    // The same commands on the unmounted store, with paths inside the volume.
    fs::write(m.path("hf/blobs/w"), b"w").unwrap();
    m.unmount();
    kcache_ok(&["pin", "--store", &store, "/hf"]);
    let out = kcache_ok(&["pins", "--store", &store]);
    assert!(out.contains("/hf"), "{out}");
    let out = kcache_ok(&["du", "--store", &store, "/hf"]);
    assert!(out.contains("/hf"), "{out}");
    let out = kcache_ok(&["clear", "--yes", "--store", &store, "/hf"]);
    assert!(out.contains("removed 2 names"), "{out}");
    let out = kcache_ok(&["gc", "--store", &store, "--json"]);
    assert!(out.contains("wal_bytes_after"), "{out}");
    let (code, out) = kcache(&["du", "--store", &store, "/nope"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("/nope"), "{out}");
    // Import into the unmounted store (it is mounted privately for the copy).
    let src = tempfile::tempdir().unwrap();
    fs::create_dir(src.path().join("d")).unwrap();
    fs::write(src.path().join("d/file"), b"imported offline").unwrap();
    let out = kcache_ok(&[
        "import",
        "--store",
        &store,
        src.path().to_str().unwrap(),
        "/offline",
    ]);
    assert!(out.contains("imported 1 files"), "{out}");
    m.remount();
    assert!(m.path("hf").is_dir() && enoent(&m.path("hf/blobs")));
    assert_eq!(
        fs::read(m.path("offline/d/file")).unwrap(),
        b"imported offline"
    );
    m.unmount();
    let (ok, out) = m.verify();
    assert!(ok, "{out}");
}
