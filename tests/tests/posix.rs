//! POSIX behaviour of a real kcache mount: every operation the cache tools use, in both I/O
//! modes (kernel passthrough and daemon-served), and persistence across remounts.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use kcache_tests::{pseudo_random, Mount};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> i32 {
    let (a, b) = (c(a), c(b));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

fn basic_ops(m: &Mount) {
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    assert_eq!(errno_of(fs::create_dir(&d)), libc::EEXIST);
    fs::write(d.join("f"), b"hello").unwrap();
    assert_eq!(fs::read(d.join("f")).unwrap(), b"hello");
    assert_eq!(errno_of(fs::remove_dir(&d)), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::read(d.join("missing"))), libc::ENOENT);

    // Overwrite in place, partial writes, append.
    let f = OpenOptions::new().write(true).open(d.join("f")).unwrap();
    f.write_all_at(b"J", 0).unwrap();
    drop(f);
    assert_eq!(fs::read(d.join("f")).unwrap(), b"Jello");
    let mut f = OpenOptions::new().append(true).open(d.join("f")).unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(fs::read(d.join("f")).unwrap(), b"Jello world");

    // Readers opened while a writer is open see the staged content.
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("f"))
        .unwrap();
    w.write_all_at(b"HELLO", 0).unwrap();
    assert_eq!(fs::read(d.join("f")).unwrap(), b"HELLO world");
    w.set_len(5).unwrap();
    assert_eq!(fs::metadata(d.join("f")).unwrap().len(), 5);
    drop(w);
    assert_eq!(fs::read(d.join("f")).unwrap(), b"HELLO");

    // truncate by path and O_TRUNC.
    let f = OpenOptions::new().write(true).open(d.join("f")).unwrap();
    f.set_len(2).unwrap();
    drop(f);
    assert_eq!(fs::read(d.join("f")).unwrap(), b"HE");
    fs::write(d.join("f"), b"").unwrap();
    assert_eq!(fs::metadata(d.join("f")).unwrap().len(), 0);

    // Names: exactly 255 bytes work, 256 is ENAMETOOLONG.
    let long = "x".repeat(255);
    fs::write(d.join(&long), b"1").unwrap();
    assert_eq!(
        errno_of(fs::write(d.join("y".repeat(256)), b"1")),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(fs::metadata(d.join("y".repeat(256)))),
        libc::ENAMETOOLONG
    );

    // O_EXCL honoured.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d.join(&long));
    assert_eq!(errno_of(e), libc::EEXIST);

    // Symlinks: exact bytes, relative, dangling, chains.
    std::os::unix::fs::symlink("f", d.join("l1")).unwrap();
    std::os::unix::fs::symlink("l1", d.join("l2")).unwrap();
    std::os::unix::fs::symlink("../nowhere/\u{e9}x", d.join("dangling")).unwrap();
    assert_eq!(fs::read_link(d.join("l2")).unwrap(), Path::new("l1"));
    assert_eq!(
        fs::read_link(d.join("dangling")).unwrap(),
        Path::new("../nowhere/\u{e9}x")
    );
    fs::write(d.join("f"), b"via link").unwrap();
    assert_eq!(fs::read(d.join("l2")).unwrap(), b"via link");
    assert_eq!(errno_of(fs::read(d.join("dangling"))), libc::ENOENT);
    assert!(fs::symlink_metadata(d.join("l1"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Replacing a regular file by a symlink with rename (what huggingface_hub does).
    std::os::unix::fs::symlink("f", d.join("tmp-link")).unwrap();
    fs::write(d.join("target"), b"regular").unwrap();
    fs::rename(d.join("tmp-link"), d.join("target")).unwrap();
    assert_eq!(fs::read(d.join("target")).unwrap(), b"via link");

    // Hard links and link counts.
    fs::hard_link(d.join("f"), d.join("h")).unwrap();
    assert_eq!(fs::metadata(d.join("f")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(d.join("f")).unwrap().ino(),
        fs::metadata(d.join("h")).unwrap().ino()
    );
    fs::write(d.join("h"), b"changed through h").unwrap();
    assert_eq!(fs::read(d.join("f")).unwrap(), b"changed through h");
    fs::remove_file(d.join("h")).unwrap();
    assert_eq!(fs::metadata(d.join("f")).unwrap().nlink(), 1);
    assert_eq!(errno_of(fs::hard_link(&d, m.path("dirlink"))), libc::EPERM);

    // Directory link counts: 2 + subdirectories.
    fs::create_dir(d.join("s1")).unwrap();
    fs::create_dir(d.join("s2")).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 4);
    fs::remove_dir(d.join("s2")).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 3);

    // Renames: over a file, across directories, over an empty dir, NOREPLACE, EXCHANGE.
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert!(!m.path("a").exists());
    fs::rename(m.path("b"), d.join("s1/moved")).unwrap();
    assert_eq!(fs::read(d.join("s1/moved")).unwrap(), b"A");
    fs::create_dir(m.path("empty")).unwrap();
    fs::create_dir(m.path("src")).unwrap();
    fs::write(m.path("src/x"), b"x").unwrap();
    fs::rename(m.path("src"), m.path("empty")).unwrap();
    assert_eq!(fs::read(m.path("empty/x")).unwrap(), b"x");
    assert_eq!(
        errno_of(fs::rename(m.path("empty"), d.join("s1/moved"))),
        libc::ENOTDIR
    );
    assert_eq!(errno_of(fs::rename(&d, d.join("s1/inside"))), libc::EINVAL);
    fs::write(m.path("p"), b"P").unwrap();
    fs::write(m.path("q"), b"Q").unwrap();
    assert_eq!(
        renameat2(&m.path("p"), &m.path("q"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(
        renameat2(&m.path("p"), &m.path("q"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(fs::read(m.path("p")).unwrap(), b"Q");
    assert_eq!(fs::read(m.path("q")).unwrap(), b"P");
    assert_eq!(
        renameat2(&m.path("p"), &m.path("new"), libc::RENAME_NOREPLACE),
        0
    );
    assert_eq!(fs::read(m.path("new")).unwrap(), b"Q");

    // rmdir.
    assert_eq!(errno_of(fs::remove_dir(m.path("new"))), libc::ENOTDIR);
    fs::remove_dir(d.join("s1/..").join("s1").join("..").join("s1")).unwrap_err();
    fs::remove_file(d.join("s1/moved")).unwrap();
    fs::remove_dir(d.join("s1")).unwrap();

    // xattrs.
    let f = d.join("f");
    xattr_set(&f, "user.k", b"v1", 0).unwrap();
    assert_eq!(xattr_get(&f, "user.k").unwrap(), b"v1");
    assert_eq!(
        xattr_set(&f, "user.k", b"v2", libc::XATTR_CREATE).unwrap_err(),
        libc::EEXIST
    );
    xattr_set(&f, "user.k", b"v2", libc::XATTR_REPLACE).unwrap();
    assert_eq!(
        xattr_set(&f, "user.none", b"v", libc::XATTR_REPLACE).unwrap_err(),
        libc::ENODATA
    );
    xattr_set(&f, "user.other", b"", 0).unwrap();
    let mut names = xattr_list(&f);
    names.sort();
    assert_eq!(names, vec!["user.k".to_string(), "user.other".to_string()]);
    xattr_remove(&f, "user.other").unwrap();
    assert_eq!(xattr_get(&f, "user.other").unwrap_err(), libc::ENODATA);

    // chmod, chown, utimens.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    set_times(&f, 1_000_000_123, 2_000_000_456);
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1, 123));
    assert_eq!((md.mtime(), md.mtime_nsec()), (2, 456));

    // fsync of a directory (makes the namespace durable).
    File::open(&d).unwrap().sync_all().unwrap();

    // statfs reports the store's disk.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&m.mnt).as_ptr(), &mut s) }, 0);
    assert!(s.f_blocks > 0 && s.f_namemax == 255);

    // access(2).
    assert_eq!(
        unsafe { libc::access(c(&f).as_ptr(), libc::R_OK | libc::W_OK) },
        0
    );
}

fn set_times(p: &Path, atime_ns: i64, mtime_ns: i64) {
    let ts = [
        libc::timespec {
            tv_sec: atime_ns / 1_000_000_000,
            tv_nsec: atime_ns % 1_000_000_000,
        },
        libc::timespec {
            tv_sec: mtime_ns / 1_000_000_000,
            tv_nsec: mtime_ns % 1_000_000_000,
        },
    ];
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), ts.as_ptr(), 0) },
        0
    );
}

fn xattr_set(p: &Path, n: &str, v: &[u8], flags: i32) -> Result<(), i32> {
    let n = CString::new(n).unwrap();
    let r = unsafe { libc::setxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

fn xattr_get(p: &Path, n: &str) -> Result<Vec<u8>, i32> {
    let n = CString::new(n).unwrap();
    let mut buf = vec![0u8; 1024];
    let r = unsafe {
        libc::getxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_list(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 1024];
    let r = unsafe { libc::listxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0);
    buf.truncate(r as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn xattr_remove(p: &Path, n: &str) -> Result<(), i32> {
    let n = CString::new(n).unwrap();
    let r = unsafe { libc::removexattr(c(p).as_ptr(), n.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

#[test]
fn operations_passthrough() {
    let Some(m) = Mount::new() else { return };
    basic_ops(&m);
    open_files_survive_unlink_and_rename(&m);
    mmap_shared_and_private(&m);
}

#[test]
fn operations_daemon_io() {
    let Some(m) = Mount::with_opts(&["nopassthrough"]) else {
        return;
    };
    basic_ops(&m);
    open_files_survive_unlink_and_rename(&m);
    mmap_shared_and_private(&m);
}

fn open_files_survive_unlink_and_rename(m: &Mount) {
    // Unlink of an open file: it stays readable (and writable) until closed.
    fs::write(m.path("victim"), b"still here").unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("victim"))
        .unwrap();
    fs::remove_file(m.path("victim")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    f.write_all_at(b"S", 0).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "Still here");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    assert!(!m.path("victim").exists());

    // Rename over a file another process has open: the reader keeps the old data.
    fs::write(m.path("cfg"), b"old content").unwrap();
    let mut reader = File::open(m.path("cfg")).unwrap();
    fs::write(m.path("cfg.tmp"), b"new content!").unwrap();
    fs::rename(m.path("cfg.tmp"), m.path("cfg")).unwrap();
    let mut s = String::new();
    reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "old content");
    assert_eq!(fs::read(m.path("cfg")).unwrap(), b"new content!");
}

fn mmap_shared_and_private(m: &Mount) {
    let p = m.path("mapped");
    let data = pseudo_random(7, 1 << 20);
    fs::write(&p, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    unsafe {
        let len = data.len();
        let shared = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(
            shared,
            libc::MAP_FAILED,
            "shared mmap failed: {}",
            std::io::Error::last_os_error()
        );
        let s = std::slice::from_raw_parts_mut(shared as *mut u8, len);
        assert_eq!(&s[..4096], &data[..4096]);
        s[..5].copy_from_slice(b"MMAP!");
        assert_eq!(libc::msync(shared, len, libc::MS_SYNC), 0);
        libc::munmap(shared, len);
    }
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(&got[..5], b"MMAP!");
    assert_eq!(&got[5..], &data[5..]);
    // A private read-only map (safetensors' pattern) of a committed file.
    let f = File::open(&p).unwrap();
    unsafe {
        let len = data.len();
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts(map as *const u8, len);
        assert_eq!(&s[..5], b"MMAP!");
        assert_eq!(&s[len - 100..], &data[len - 100..]);
        libc::munmap(map, len);
    }
}

#[test]
fn metadata_and_content_persist_across_remount() {
    let Some(mut m) = Mount::new() else { return };
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/b/file"), b"persist me").unwrap();
    fs::set_permissions(m.path("a/b/file"), fs::Permissions::from_mode(0o604)).unwrap();
    std::os::unix::fs::chown(m.path("a/b/file"), Some(42), Some(43)).unwrap();
    set_times(
        &m.path("a/b/file"),
        1_500_000_000_000_000_001,
        1_600_000_000_000_000_002,
    );
    std::os::unix::fs::symlink("b/file", m.path("a/link")).unwrap();
    fs::hard_link(m.path("a/b/file"), m.path("a/hard")).unwrap();
    xattr_set(&m.path("a/b/file"), "user.tag", b"kept", 0).unwrap();
    m.remount();
    let md = fs::metadata(m.path("a/b/file")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o604);
    assert_eq!((md.uid(), md.gid()), (42, 43));
    assert_eq!((md.atime(), md.atime_nsec()), (1_500_000_000, 1));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 2));
    assert_eq!(md.nlink(), 2);
    assert_eq!(fs::read(m.path("a/link")).unwrap(), b"persist me");
    assert_eq!(fs::read(m.path("a/hard")).unwrap(), b"persist me");
    assert_eq!(xattr_get(&m.path("a/b/file"), "user.tag").unwrap(), b"kept");
    m.unmount();
    let (ok, out) = m.verify();
    assert!(ok, "{out}");
}

#[test]
fn new_files_belong_to_the_caller() {
    let Some(m) = Mount::with_opts(&["allow_other"]) else {
        return;
    };
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let p = m.path("owned-by-nobody");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "touch"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    // And root's files are root's (pip as root checks st_uid == 0 on its cache dir).
    fs::create_dir(m.path("rootdir")).unwrap();
    assert_eq!(fs::metadata(m.path("rootdir")).unwrap().uid(), 0);
    // The kernel enforces mode bits for other users.
    fs::write(m.path("secret"), b"x").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(m.path("secret"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn readdir_large_and_stable_under_changes() {
    let Some(m) = Mount::new() else { return };
    let d = m.path("many");
    fs::create_dir(&d).unwrap();
    for i in 0..5000 {
        File::create(d.join(format!("f{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 5000);
    assert_eq!(names[0], "f00000");
    assert_eq!(names[4999], "f04999");

    // Listing while another thread adds and removes other entries: every entry that stays put
    // is seen exactly once.
    let d2 = d.clone();
    let churn = std::thread::spawn(move || {
        for i in 0..2000 {
            let p = d2.join(format!("churn{i}"));
            File::create(&p).unwrap();
            if i % 2 == 0 {
                fs::remove_file(&p).unwrap();
            }
        }
    });
    let mut seen = std::collections::HashMap::new();
    for e in fs::read_dir(&d).unwrap() {
        *seen
            .entry(e.unwrap().file_name().into_string().unwrap())
            .or_insert(0) += 1;
    }
    churn.join().unwrap();
    for i in 0..5000 {
        assert_eq!(seen.get(&format!("f{i:05}")), Some(&1), "f{i:05}");
    }
    assert!(seen.values().all(|&n| n == 1));
}

#[test]
fn large_files_and_offsets_past_4gib() {
    let Some(mut m) = Mount::new() else { return };
    // 1 GiB written in 1 MiB chunks and read back bit-identical.
    let p = m.path("big");
    let mut f = File::create(&p).unwrap();
    let mut h = blake3::Hasher::new();
    for i in 0..1024u64 {
        let chunk = pseudo_random(i, 1 << 20);
        h.update(&chunk);
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let want = h.finalize();
    assert_eq!(fs::metadata(&p).unwrap().len(), 1 << 30);
    assert_eq!(kcache_tests::hash_file(&p), want);

    // A 5 GiB sparse file with data past 4 GiB.
    let s = m.path("sparse");
    let f = File::create(&s).unwrap();
    let off = (4u64 << 30) + 12345;
    f.write_all_at(b"beyond 4 GiB", off).unwrap();
    f.set_len(5 << 30).unwrap();
    drop(f);
    m.remount();
    let f = File::open(&s).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5 << 30);
    let mut buf = [0u8; 12];
    f.read_exact_at(&mut buf, off).unwrap();
    assert_eq!(&buf, b"beyond 4 GiB");
    f.read_exact_at(&mut buf, 1 << 32).unwrap();
    assert_eq!(buf, [0u8; 12]);
    assert_eq!(kcache_tests::hash_file(&p), want);
}

#[test]
fn bad_input_gets_errnos_not_panics() {
    let Some(m) = Mount::new() else { return };
    let long_target = "t".repeat(5000);
    let e = std::os::unix::fs::symlink(&long_target, m.path("toolong"));
    assert_eq!(errno_of(e), libc::ENAMETOOLONG);
    fs::create_dir(m.path("dir")).unwrap();
    assert_eq!(
        errno_of(File::open(m.path("dir")).and_then(|mut f| f.read(&mut [0u8; 4]))),
        libc::EISDIR
    );
    assert_eq!(errno_of(fs::remove_file(m.path("dir"))), libc::EISDIR);
    assert_eq!(errno_of(fs::read_link(m.path("dir"))), libc::EINVAL);
    assert_eq!(
        xattr_get(&m.path("dir"), "user.absent").unwrap_err(),
        libc::ENODATA
    );
    // The daemon is still alive and well.
    fs::write(m.path("dir/ok"), b"ok").unwrap();
    assert_eq!(fs::read(m.path("dir/ok")).unwrap(), b"ok");
}

#[test]
fn read_only_mount_refuses_changes() {
    let Some(mut m) = Mount::new() else { return };
    fs::write(m.path("kept"), b"data").unwrap();
    m.unmount();
    m.opts = vec!["ro".into()];
    m.restart_after_crash();
    assert_eq!(fs::read(m.path("kept")).unwrap(), b"data");
    assert_eq!(errno_of(fs::write(m.path("new"), b"x")), libc::EROFS);
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(m.path("kept"))),
        libc::EROFS
    );
    assert_eq!(errno_of(fs::remove_file(m.path("kept"))), libc::EROFS);
    // Nothing changed through this mount, so there is nothing to sync, and fsync says so.
    fs::File::open(m.path("kept")).unwrap().sync_all().unwrap();
    fs::File::open(m.path("")).unwrap().sync_all().unwrap();
}

/// Runs `sh -c script` as nobody (65534:65534, no supplementary groups, so without
/// CAP_FSETID) with `$F` set to `f`.
fn as_nobody(script: &str, f: &Path) {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(script)
        .env("F", f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mode bits left after each way Linux clears setuid/setgid (write, truncate, O_TRUNC
/// open and chown, with and without CAP_FSETID), run in `dir`.
fn modes_after_privilege_kills(dir: &Path) -> Vec<(&'static str, u32)> {
    use std::os::unix::fs::chown;
    let f = dir.join("f");
    let reset = |mode: u32| {
        fs::write(&f, b"abc").unwrap();
        chown(&f, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    };
    // statx asking for the mode only: the kernel answers from its cached attributes unless
    // they were invalidated, so a mode the daemon changed without telling it shows up stale.
    let mode = || {
        let c = c(&f);
        // SAFETY: a zeroed statx filled by the kernel for a valid C path.
        let mut sx: libc::statx = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MODE, &mut sx) };
        assert_eq!(rc, 0);
        u32::from(sx.stx_mode) & 0o7777
    };
    let mut seen = Vec::new();
    reset(0o6755);
    as_nobody("printf x >> \"$F\"", &f);
    seen.push(("write by nobody", mode()));
    reset(0o6755);
    as_nobody("truncate -s 1 \"$F\"", &f);
    seen.push(("truncate by nobody", mode()));
    reset(0o6755);
    as_nobody(": > \"$F\"", &f);
    seen.push(("O_TRUNC open by nobody", mode()));
    reset(0o2745);
    as_nobody("printf x >> \"$F\"", &f);
    seen.push(("write by nobody, setgid without group exec", mode()));
    reset(0o6755);
    OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b"root")
        .unwrap();
    seen.push(("write by root", mode()));
    reset(0o6755);
    chown(&f, Some(1), Some(1)).unwrap();
    seen.push(("chown by root", mode()));
    let d = dir.join("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2775)).unwrap();
    chown(&d, Some(1), Some(1)).unwrap();
    seen.push((
        "chown of a setgid directory",
        fs::metadata(&d).unwrap().mode() & 0o7777,
    ));
    // The content is whole after each of them.
    assert_eq!(fs::read(&f).unwrap(), b"abc");
    seen
}

#[test]
fn setuid_and_setgid_are_cleared_as_on_ext4() {
    // The daemon clears them itself (FUSE_HANDLE_KILLPRIV_V2); the kernel only flags when.
    let Some(m) = Mount::with_opts(&["allow_other"]) else {
        return;
    };
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let native = m.mnt.parent().unwrap().join("native-kill");
    fs::create_dir_all(&native).unwrap();
    fs::set_permissions(&native, fs::Permissions::from_mode(0o777)).unwrap();
    let want = modes_after_privilege_kills(&native);
    // The cases differ from each other, so a no-op or an always-clear would both fail.
    assert!(want.iter().any(|(_, m)| m & 0o6000 != 0));
    assert!(want.iter().any(|(_, m)| m & 0o6000 == 0));
    let got = modes_after_privilege_kills(&m.mnt);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(
            format!("{}: {:o}", w.0, w.1),
            format!("{}: {:o}", g.0, g.1),
            "kcache differs from ext4"
        );
    }
    fs::remove_dir_all(&native).unwrap();
}

/// Whether `security.capability` is still there after each kind of write, run in `dir`.
fn capability_after_writes(dir: &Path) -> Vec<(&'static str, bool)> {
    let f = dir.join("cap");
    let has = || xattr_get(&f, "security.capability").is_ok();
    let setcap = || {
        let st = std::process::Command::new("setcap")
            .args(["cap_net_raw+ep"])
            .arg(&f)
            .status()
            .unwrap();
        assert!(st.success(), "setcap failed");
    };
    let reset = || {
        fs::write(&f, b"abc").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        setcap();
    };
    let mut seen = Vec::new();
    reset();
    seen.push(("no write", has()));
    reset();
    // O_WRONLY: a direct handle on kcache, which the kernel removes nothing for.
    let mut w = OpenOptions::new().append(true).open(&f).unwrap();
    w.write_all(b"x").unwrap();
    seen.push(("O_WRONLY write by root, file still open", has()));
    drop(w);
    reset();
    let rw = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    rw.write_all_at(b"y", 0).unwrap();
    drop(rw);
    seen.push(("O_RDWR write by root", has()));
    reset();
    as_nobody("printf x >> \"$F\"", &f);
    seen.push(("write by nobody", has()));
    reset();
    // A second write of the same open file, after the capability was set again.
    let mut w = OpenOptions::new().append(true).open(&f).unwrap();
    w.write_all(b"1").unwrap();
    setcap();
    w.write_all(b"2").unwrap();
    seen.push(("write after setcap on an open file", has()));
    seen
}

#[test]
fn writes_remove_security_capability_as_on_ext4() {
    let Some(m) = Mount::with_opts(&["allow_other"]) else {
        return;
    };
    if std::process::Command::new("setcap")
        .arg("-v")
        .output()
        .is_err()
    {
        panic!("setcap (libcap2-bin) is needed");
    }
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let native = m.mnt.parent().unwrap().join("native-cap");
    fs::create_dir_all(&native).unwrap();
    fs::set_permissions(&native, fs::Permissions::from_mode(0o777)).unwrap();
    let want = capability_after_writes(&native);
    // The control keeps it and the writes drop it, so neither answer alone passes.
    assert!(want.iter().any(|(_, h)| *h) && want.iter().any(|(_, h)| !*h));
    let got = capability_after_writes(&m.mnt);
    assert_eq!(got, want, "kcache differs from ext4");
    fs::remove_dir_all(&native).unwrap();
}
