//! Sparse files on real mounts: holes kept through commit, remount, dedup, copy-on-write and
//! downloads; st_blocks and `du` honest; SEEK_DATA/SEEK_HOLE and fallocate compared with
//! the same operations on a native file of the temp directory's filesystem (ext4 in CI),
//! with kernel passthrough and with daemon-served handles.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use kcache_tests::{hash_file, kcache_ok, Mount};

const MIB: u64 = 1 << 20;
/// One 4 KiB block is 8 sectors; allow a filesystem some metadata. 100 MiB is 204800.
const SMALL: u64 = 64;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn seek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// The data extents SEEK_DATA/SEEK_HOLE report, and both answers at offsets around every
/// interesting place of a file of `size` bytes (before it and past the end too).
fn hole_map(f: &File, size: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 0i64;
    while let Ok(d) = seek(f, pos, libc::SEEK_DATA) {
        let h = seek(f, d, libc::SEEK_HOLE).unwrap();
        out.push(format!("data {d}..{h}"));
        pos = h;
    }
    let s = size as i64;
    for off in [
        -1,
        0,
        1,
        4096,
        65536,
        (MIB / 2) as i64,
        MIB as i64,
        s - 1,
        s,
        s + 1,
        s * 10,
    ] {
        out.push(format!(
            "{off}: data {:?} hole {:?}",
            seek(f, off, libc::SEEK_DATA),
            seek(f, off, libc::SEEK_HOLE)
        ));
    }
    out
}

/// Checks a `hole_map` against the content: every byte outside the data extents is zero.
fn assert_map_fits(map: &[String], content: &[u8], what: &str) {
    let mut covered = vec![false; content.len()];
    for e in map.iter().filter_map(|l| l.strip_prefix("data ")) {
        let (a, b) = e.split_once("..").unwrap();
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        assert!(a < b && b <= content.len(), "{what}: extent {e} in {map:?}");
        covered[a..b].fill(true);
    }
    if let Some(i) = (0..content.len()).find(|&i| !covered[i] && content[i] != 0) {
        panic!("{what}: byte {i} is not zero but in a hole: {map:?}");
    }
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

fn blocks(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks()
}

/// `du -k` of a path, in KiB (what the allocation looks like to the usual tool).
fn du_k(p: &Path) -> u64 {
    let out = Command::new("du").arg("-sk").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The blob file of content with hash `h` in a store.
fn blob_path(store: &Path, h: &blake3::Hash) -> PathBuf {
    let hex = h.to_hex();
    store.join("blobs").join(&hex[..2]).join(hex.as_str())
}

/// Whether the temp directory's filesystem keeps holes; the comparisons mean nothing where
/// it does not.
fn native_has_holes(dir: &Path) -> bool {
    let f = File::create(dir.join("probe")).unwrap();
    f.set_len(MIB).unwrap();
    let r = seek(&f, 0, libc::SEEK_HOLE) == Ok(0);
    if !r {
        eprintln!("skipping: {} keeps no holes", dir.display());
    }
    r
}

/// A 100 MiB file holding one byte (its last).
fn one_byte_file(p: &Path) {
    let f = rw(p);
    f.write_all_at(b"x", 100 * MIB - 1).unwrap();
}

fn disk_bytes(m: &Mount) -> u64 {
    m.stats()["disk_bytes"].as_u64().unwrap()
}

#[test]
fn a_100_mib_file_holding_one_byte_stays_small_through_commit_remount_dedup_and_cow() {
    let native = tempfile::tempdir().unwrap();
    if !native_has_holes(native.path()) {
        return;
    }
    let Some(mut m) = Mount::new() else { return };
    let (a, b) = (m.path("a"), m.path("b"));
    // Staged: the staging file's allocation.
    let f = rw(&a);
    f.write_all_at(b"x", 100 * MIB - 1).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), 100 * MIB);
    assert!(meta.blocks() <= SMALL, "staged: {} blocks", meta.blocks());
    drop(f);
    m.settle();
    one_byte_file(&native.path().join("a"));
    let want = hash_file(&native.path().join("a"));
    assert_eq!(hash_file(&a), want);
    // Committed: the blob file's allocation, as recorded.
    assert!(blocks(&a) <= SMALL, "committed: {} blocks", blocks(&a));
    assert!(du_k(&a) <= SMALL / 2, "du -k: {}", du_k(&a));
    assert!(blocks(&blob_path(&m.store, &want)) <= SMALL);
    let s = m.stats();
    assert_eq!(s["stored_bytes"], 100 * MIB, "{s}");
    assert!(s["disk_bytes"].as_u64().unwrap() <= SMALL * 512, "{s}");
    let du: serde_json::Value =
        serde_json::from_str(&kcache_ok(&["du", "--json", m.mnt.to_str().unwrap()])).unwrap();
    assert!(du[0]["disk_bytes"].as_u64().unwrap() <= SMALL * 512, "{du}");
    assert_eq!(du[0]["logical_bytes"], 100 * MIB, "{du}");

    // After a remount the figure comes from the index.
    m.remount();
    assert!(blocks(&a) <= SMALL, "after remount: {} blocks", blocks(&a));
    assert_eq!(hash_file(&a), want);

    // The same content again: one blob, the second name small too.
    one_byte_file(&b);
    m.settle();
    assert_eq!(m.stats()["blobs"], 1);
    assert!(blocks(&b) <= SMALL, "dedup: {} blocks", blocks(&b));

    // Copy-on-write: one byte changed in the middle copies the blob, holes kept.
    let f = OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(b"y", 50 * MIB).unwrap();
    assert!(f.metadata().unwrap().blocks() <= 2 * SMALL, "cow staged");
    drop(f);
    m.settle();
    assert!(blocks(&a) <= 2 * SMALL, "after cow: {} blocks", blocks(&a));
    assert_eq!(m.stats()["blobs"], 2);
    assert!(disk_bytes(&m) <= 3 * SMALL * 512, "{}", m.stats());
    let f = File::open(&a).unwrap();
    let mut buf = [1u8; 3];
    f.read_exact_at(&mut buf, 50 * MIB - 1).unwrap();
    assert_eq!(&buf, b"\0y\0");
    f.read_exact_at(&mut buf[..1], 100 * MIB - 1).unwrap();
    assert_eq!(buf[0], b'x');
    assert_eq!(hash_file(&b), want, "the other name kept the old content");
    assert!(
        du_k(&m.mnt) <= 2 * SMALL,
        "du -sk of the mount: {}",
        du_k(&m.mnt)
    );
}

/// The layout both files get: a few bytes at the start, 5000 at 1 MiB, the last byte.
fn layout(f: &File, size: u64) {
    f.write_all_at(b"0123456789", 0).unwrap();
    f.write_all_at(&[7u8; 5000], MIB).unwrap();
    f.write_all_at(b"e", size - 1).unwrap();
}

fn seeks_match_native(m: &Mount, native: &Path) {
    let size = 2 * MIB + 100;
    let nf = rw(&native.join("n"));
    layout(&nf, size);
    let p = m.path("f");
    layout(&rw(&p), size);
    m.settle();
    let want = hole_map(&nf, size);
    assert!(
        want.iter().filter(|l| l.starts_with("data ")).count() == 3,
        "the native file has holes: {want:?}"
    );
    // Committed: the blob file answers (through a passthrough handle on a passthrough mount).
    let r = File::open(&p).unwrap();
    assert_eq!(hole_map(&r, size), want, "committed");
    drop(r);

    // Staged: data written into a hole is data at once, for the writer and for a reader
    // opened meanwhile (daemon-served while the writer is open).
    let w = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    w.write_all_at(&[9u8; 100], MIB + MIB / 2).unwrap();
    nf.write_all_at(&[9u8; 100], MIB + MIB / 2).unwrap();
    let want = hole_map(&nf, size);
    assert_eq!(hole_map(&w, size), want, "staged, writer");
    let r = File::open(&p).unwrap();
    assert_eq!(hole_map(&r, size), want, "staged, reader");
    drop((w, r));
    m.settle();
    let r = File::open(&p).unwrap();
    assert_eq!(hole_map(&r, size), want, "committed again");
    // SEEK_SET, SEEK_CUR and SEEK_END still work (the kernel's).
    let mut r = r;
    use std::io::{Seek, SeekFrom};
    assert_eq!(r.seek(SeekFrom::End(-1)).unwrap(), size - 1);
    assert_eq!(r.seek(SeekFrom::Current(-9)).unwrap(), size - 10);
}

#[test]
fn seek_data_and_seek_hole_match_the_native_filesystem_with_passthrough() {
    let native = tempfile::tempdir().unwrap();
    if !native_has_holes(native.path()) {
        return;
    }
    let Some(m) = Mount::new() else { return };
    seeks_match_native(&m, native.path());
}

#[test]
fn seek_data_and_seek_hole_match_the_native_filesystem_with_daemon_io() {
    let native = tempfile::tempdir().unwrap();
    if !native_has_holes(native.path()) {
        return;
    }
    let Some(m) = Mount::with_opts(&["nopassthrough"]) else {
        return;
    };
    seeks_match_native(&m, native.path());
}

#[test]
fn fallocate_modes_match_the_native_filesystem() {
    let native = tempfile::tempdir().unwrap();
    if !native_has_holes(native.path()) {
        return;
    }
    let Some(m) = Mount::new() else { return };
    const K: u64 = 1024;
    let base = |f: &File| {
        f.write_all_at(&vec![0xAB; (256 * K) as usize], 0).unwrap();
        f.write_all_at(&vec![0xCD; (256 * K) as usize], 768 * K)
            .unwrap();
    };
    let cases: &[(&str, i32, u64, u64)] = &[
        ("allocate, extending", 0, 512 * K, MIB),
        ("keep size", libc::FALLOC_FL_KEEP_SIZE, 512 * K, MIB),
        (
            "punch hole",
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            64 * K,
            128 * K,
        ),
        ("zero range", libc::FALLOC_FL_ZERO_RANGE, 128 * K, 256 * K),
        (
            "zero range, extending",
            libc::FALLOC_FL_ZERO_RANGE,
            896 * K,
            256 * K,
        ),
        (
            "zero range, keep size",
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            896 * K,
            256 * K,
        ),
        (
            "collapse range",
            libc::FALLOC_FL_COLLAPSE_RANGE,
            128 * K,
            256 * K,
        ),
        (
            "insert range",
            libc::FALLOC_FL_INSERT_RANGE,
            128 * K,
            64 * K,
        ),
    ];
    for (i, &(what, mode, off, len)) in cases.iter().enumerate() {
        let nf = rw(&native.path().join(format!("n{i}")));
        base(&nf);
        let r = unsafe { libc::fallocate(nf.as_raw_fd(), mode, off as i64, len as i64) };
        assert_eq!(r, 0, "{what} on the native file: errno {}", errno());
        let nsize = nf.metadata().unwrap().len();
        let mut want = vec![0u8; nsize as usize];
        nf.read_exact_at(&mut want, 0).unwrap();

        // Committed first, so the change goes through a copy-on-write staging file.
        let p = m.path(&format!("f{i}"));
        base(&rw(&p));
        m.settle();
        let f = rw(&p);
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if r != 0 {
            // Linux's FUSE module refuses these itself (fs/fuse/file.c passes on only
            // KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE); the file must be untouched.
            assert!(
                mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0,
                "{what}: errno {}",
                errno()
            );
            assert_eq!(errno(), libc::EOPNOTSUPP, "{what}");
            drop(f);
            m.settle();
            let mut base_content = vec![0u8; MIB as usize];
            base_content[..(256 * K) as usize].fill(0xAB);
            base_content[(768 * K) as usize..].fill(0xCD);
            assert!(fs::read(&p).unwrap() == base_content, "{what}: changed");
            eprintln!("{what}: refused by the kernel (EOPNOTSUPP), as documented");
            continue;
        }
        assert_eq!(f.metadata().unwrap().len(), nsize, "{what}: size");
        let staged = hole_map(&f, nsize);
        let mut got = vec![0u8; nsize as usize];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got == want, "{what}: content");
        // While staged, ext4's answers also depend on its delayed allocation, which
        // differs between the files: the map must fit the content; exact comparisons
        // follow once both are on disk.
        assert_map_fits(&staged, &want, what);
        f.sync_all().unwrap(); // commits, durably
        drop(f);
        m.settle();
        nf.sync_all().unwrap();
        let blob = File::open(blob_path(&m.store, &blake3::hash(&want))).unwrap();
        // ext4 counts cached pages over preallocated ranges as data: drop them on both.
        for f in [&nf, &blob] {
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0);
        }
        let r = File::open(&p).unwrap();
        assert_eq!(
            hole_map(&r, nsize),
            hole_map(&nf, nsize),
            "{what}: committed"
        );
        assert_eq!(r.metadata().unwrap().len(), nsize, "{what}: committed size");
        assert!(fs::read(&p).unwrap() == want, "{what}: committed content");
        let got = r.metadata().unwrap().blocks();
        assert_eq!(got, blob.metadata().unwrap().blocks(), "{what}: st_blocks");
        if mode != libc::FALLOC_FL_KEEP_SIZE {
            assert_eq!(got, nf.metadata().unwrap().blocks(), "{what}: st_blocks");
        } // else the content is the base's: its blob (without the preallocation) is used.
    }
}

#[test]
fn a_pulled_sparse_file_reads_right_and_stays_sparse() {
    let Some(a) = Mount::new() else { return };
    let native = tempfile::tempdir().unwrap();
    if !native_has_holes(native.path()) {
        return;
    }
    one_byte_file(&a.path("big"));
    a.settle();
    let want = hash_file(&a.path("big"));
    let up = tempfile::tempdir().unwrap();
    let url = format!("file://{}", up.path().display());
    kcache_ok(&["push", "--store", a.store.to_str().unwrap(), &url]);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    kcache_ok(&[
        "pull",
        "--store",
        store.to_str().unwrap(),
        &format!("{url}:default"),
    ]);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    kcache_ok(&[
        "mount",
        "--store",
        store.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    let res = std::panic::catch_unwind(|| {
        assert_eq!(hash_file(&mnt.join("big")), want);
        let blob = blob_path(&store, &want);
        // Readers read while the download goes on; it becomes the blob just after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !blob.exists() {
            assert!(std::time::Instant::now() < deadline, "never made local");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            blocks(&blob) <= SMALL,
            "downloaded blob: {} blocks",
            blocks(&blob)
        );
        let stats = || -> serde_json::Value {
            serde_json::from_str(&kcache_ok(&[
                "stats",
                "--json",
                "--store",
                store.to_str().unwrap(),
            ]))
            .unwrap()
        };
        while stats()["usage_bytes"] != 100 * MIB {
            assert!(std::time::Instant::now() < deadline, "never marked local");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let s = stats();
        let disk = s["disk_bytes"].as_u64().unwrap();
        assert!(disk > 0 && disk <= SMALL * 512, "{s}");
        assert!(
            blocks(&mnt.join("big")) <= SMALL,
            "st_blocks after the download"
        );
        // A name looked up again reports the recorded allocation.
        kcache_ok(&["umount", mnt.to_str().unwrap()]);
        kcache_ok(&[
            "mount",
            "--store",
            store.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]);
        assert!(blocks(&mnt.join("big")) <= SMALL);
        let f = File::open(mnt.join("big")).unwrap();
        assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok((100 * MIB - 4096) as i64));
    });
    let _ = Command::new(kcache_tests::kcache_bin())
        .arg("umount")
        .arg(&mnt)
        .status();
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}
