//! The filesystem logic without a mount: `KcacheFs` driven directly, as the kernel would.

use std::ffi::OsStr;
use std::sync::Arc;

use kcache_fs::{Ctx, Errno, IoMode, KcacheFs, ROOT_INO};
use kcache_store::Store;

fn fs() -> (tempfile::TempDir, KcacheFs) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let vol = store.volume("default", true, 0, 0).unwrap();
    (dir, KcacheFs::new(Arc::new(store), vol, false))
}

fn ctx() -> Ctx {
    Ctx {
        uid: 1000,
        gid: 1000,
        pid: 1,
    }
}

/// Creates `name` in `parent` and opens it write-only, as `File::create` does.
fn create_wo(
    fs: &KcacheFs,
    parent: u64,
    name: &str,
) -> kcache_fs::Result<(kcache_fs::Attr, kcache_fs::Opened)> {
    fs.create(
        parent,
        OsStr::new(name),
        0o644,
        libc::O_WRONLY | libc::O_CREAT,
        ctx(),
        false,
        None,
    )
}

fn write_file(fs: &KcacheFs, parent: u64, name: &str, data: &[u8]) -> u64 {
    let (attr, o) = create_wo(fs, parent, name).unwrap();
    assert_eq!(fs.write(o.fh, 0, data).unwrap() as usize, data.len());
    fs.release(o.fh).unwrap();
    attr.ino
}

fn read_all(fs: &KcacheFs, ino: u64) -> Vec<u8> {
    let o = fs.open(ino, libc::O_RDONLY, None).unwrap();
    let d = fs.read(o.fh, 0, 1 << 20).unwrap();
    fs.release(o.fh).unwrap();
    d
}

#[test]
fn content_is_committed_on_release_and_deduplicated() {
    let (_d, fs) = fs();
    let a = write_file(&fs, ROOT_INO, "a", b"same bytes");
    let b = write_file(&fs, ROOT_INO, "b", b"same bytes");
    assert_ne!(a, b);
    let s = fs.store().stats().unwrap();
    assert_eq!((s.files, s.blobs, s.stored_bytes), (2, 1, 10));
    assert_eq!(read_all(&fs, a), b"same bytes");
    assert_eq!(fs.getattr(b).unwrap().uid, 1000);
    fs.unlink(ROOT_INO, OsStr::new("a")).unwrap();
    fs.unlink(ROOT_INO, OsStr::new("b")).unwrap();
    // Unreachable files go at once, even though the kernel still caches both inodes.
    assert_eq!(fs.store().stats().unwrap().blobs, 0);
    fs.forget(a, 1);
    fs.forget(b, 1);
}

#[test]
fn readers_see_staged_content_while_a_writer_is_open() {
    let (_d, fs) = fs();
    let ino = write_file(&fs, ROOT_INO, "f", b"old");
    let w = fs.open(ino, libc::O_RDWR, None).unwrap();
    fs.write(w.fh, 0, b"NEW!").unwrap();
    let r = fs.open(ino, libc::O_RDONLY, None).unwrap();
    assert_eq!(fs.read(r.fh, 0, 100).unwrap(), b"NEW!");
    assert_eq!(fs.getattr(ino).unwrap().size, 4);
    fs.release(w.fh).unwrap();
    assert_eq!(fs.read(r.fh, 0, 100).unwrap(), b"NEW!");
    fs.release(r.fh).unwrap();
    assert_eq!(read_all(&fs, ino), b"NEW!");
}

#[test]
fn unlinked_open_file_lives_until_released_and_forgotten() {
    let (_d, fs) = fs();
    let attr = fs.lookup(ROOT_INO, OsStr::new("x")).unwrap_err();
    assert_eq!(attr, Errno::ENOENT);
    let ino = write_file(&fs, ROOT_INO, "x", b"keep me");
    let o = fs.open(ino, libc::O_RDONLY, None).unwrap();
    fs.unlink(ROOT_INO, OsStr::new("x")).unwrap();
    assert_eq!(fs.read(o.fh, 0, 100).unwrap(), b"keep me");
    assert_eq!(fs.getattr(ino).unwrap().nlink, 0);
    fs.release(o.fh).unwrap();
    assert_eq!(fs.getattr(ino).unwrap_err(), Errno::ENOENT);
    fs.forget(ino, 1);
    assert_eq!(fs.store().stats().unwrap().blobs, 0);
}

#[test]
fn a_file_unlinked_behind_the_filesystem_is_purged_at_its_last_close() {
    // The unlink goes straight to the store (as a merge does), so only the close can notice
    // the inode lost its last name: it must not trust what the open saw.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let vol = store.volume("default", true, 0, 0).unwrap();
    let fs = KcacheFs::new(store.clone(), vol.clone(), false);
    let ino = write_file(&fs, ROOT_INO, "x", b"gone soon");
    let o = fs.open(ino, libc::O_RDONLY, None).unwrap();
    store.ns().unlink(vol.root, b"x").unwrap();
    assert_eq!(fs.read(o.fh, 0, 100).unwrap(), b"gone soon");
    fs.release(o.fh).unwrap();
    // Gone at the close, though the kernel still knows the inode (no forget yet).
    assert_eq!(fs.getattr(ino).unwrap_err(), Errno::ENOENT);
    assert_eq!(store.stats().unwrap().blobs, 0);
    fs.forget(ino, 1);
}

#[test]
fn rename_replaces_and_readdir_offsets_resume() {
    let (_d, fs) = fs();
    for i in 0..600 {
        write_file(
            &fs,
            ROOT_INO,
            &format!("n{i:03}"),
            format!("{i}").as_bytes(),
        );
    }
    fs.rename(
        ROOT_INO,
        OsStr::new("n000"),
        ROOT_INO,
        OsStr::new("n001"),
        0,
    )
    .unwrap();
    let n1 = fs.lookup(ROOT_INO, OsStr::new("n001")).unwrap();
    assert_eq!(read_all(&fs, n1.ino), b"0");
    assert_eq!(
        fs.rename(
            ROOT_INO,
            OsStr::new("n002"),
            ROOT_INO,
            OsStr::new("n003"),
            libc::RENAME_NOREPLACE
        )
        .unwrap_err(),
        Errno::EEXIST
    );
    // Page through the listing 100 entries at a time, resuming from the last offset.
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let mut page = Vec::new();
        fs.readdir(ROOT_INO, offset, false, |_, off, _, name, _| {
            page.push((off, name.to_string_lossy().into_owned()));
            page.len() >= 100
        })
        .unwrap();
        if page.is_empty() {
            break;
        }
        offset = page.last().unwrap().0;
        names.extend(page.into_iter().map(|p| p.1));
    }
    assert_eq!(names.len(), 2 + 599);
    assert_eq!(&names[..2], &[".".to_string(), "..".to_string()]);
    let mut sorted = names[2..].to_vec();
    sorted.dedup();
    assert_eq!(sorted.len(), 599);
}

#[test]
fn truncate_and_names_and_setgid_directories() {
    let (_d, fs) = fs();
    let ino = write_file(&fs, ROOT_INO, "t", b"0123456789");
    let a = kcache_fs::SetAttrIn {
        size: Some(4),
        ..Default::default()
    };
    assert_eq!(fs.setattr(ino, &a).unwrap().size, 4);
    assert_eq!(read_all(&fs, ino), b"0123");
    let long = "z".repeat(256);
    assert_eq!(
        fs.mkdir(ROOT_INO, OsStr::new(&long), 0o755, ctx())
            .unwrap_err(),
        Errno::ENAMETOOLONG
    );
    let d = fs
        .mkdir(
            ROOT_INO,
            OsStr::new("sg"),
            0o2775,
            Ctx {
                uid: 5,
                gid: 77,
                pid: 1,
            },
        )
        .unwrap();
    let f = fs.mkdir(d.ino, OsStr::new("child"), 0o755, ctx()).unwrap();
    assert_eq!(f.gid, 77);
    assert_ne!(f.perm & libc::S_ISGID, 0);
    assert_eq!(
        fs.rmdir(ROOT_INO, OsStr::new("sg")).unwrap_err().0,
        libc::ENOTEMPTY
    );
}

#[test]
fn o_trunc_updates_mtime_even_on_an_empty_file() {
    let (_d, fs) = fs();
    let ino = write_file(&fs, ROOT_INO, "empty", b"");
    let a = kcache_fs::SetAttrIn {
        mtime: Some(kcache_fs::TimeSet::At(1_000_000_000)),
        ..Default::default()
    };
    fs.setattr(ino, &a).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().mtime, 1_000_000_000);
    let o = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC, None).unwrap();
    assert!(fs.getattr(ino).unwrap().mtime > 1_000_000_000);
    fs.release(o.fh).unwrap();
    assert!(fs.getattr(ino).unwrap().mtime > 1_000_000_000);
}

/// Regression: a lookup that read a file's row just before a release committed it, and
/// looked for the open file just after, answered with the row's old size, which the kernel
/// took over its own: the next write through it then cut the file short (CI saw a copied
/// 10000-byte file read back as 4 bytes). Once written, a file never looks shorter.
#[test]
fn lookups_racing_a_commit_never_report_the_size_before_the_writes() {
    let (_d, fs) = fs();
    let fs = Arc::new(fs);
    for i in 0..300 {
        let name = format!("f{i}");
        let (attr, o) = fs
            .create(
                ROOT_INO,
                OsStr::new(&name),
                0o644,
                libc::O_WRONLY | libc::O_CREAT,
                ctx(),
                false,
                None,
            )
            .unwrap();
        fs.write(o.fh, 0, &[b'a'; 10000]).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looker = {
            let (fs, stop, name) = (fs.clone(), stop.clone(), name.clone());
            std::thread::spawn(move || {
                let mut sizes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sizes.push(fs.lookup(ROOT_INO, OsStr::new(&name)).unwrap().size);
                }
                sizes
            })
        };
        std::thread::yield_now();
        fs.release(o.fh).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sizes = looker.join().unwrap();
        assert!(
            sizes.iter().all(|s| *s == 10000),
            "round {i}: lookups saw sizes {:?}",
            sizes.iter().filter(|s| **s != 10000).collect::<Vec<_>>()
        );
        fs.forget(attr.ino, 1 + sizes.len() as u64);
    }
}

// ---- sparse files -------------------------------------------------------------------

const MIB: u64 = 1 << 20;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// lseek on a native file, as `KcacheFs::lseek` answers: the offset or the errno.
fn native_seek(f: &std::fs::File) -> impl Fn(i64, i32) -> Result<i64, i32> + '_ {
    use std::os::unix::io::AsRawFd;
    move |off, whence| {
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r)
        }
    }
}

fn fs_seek(fs: &KcacheFs, fh: u64) -> impl Fn(i64, i32) -> Result<i64, i32> + '_ {
    move |off, whence| fs.lseek(fh, off, whence).map_err(|e| e.0)
}

/// The data extents SEEK_DATA/SEEK_HOLE report, and the answers of both at offsets around
/// every interesting place of a file of `size` bytes (past the end too).
fn hole_map(size: u64, seek: impl Fn(i64, i32) -> Result<i64, i32>) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 0i64;
    while let Ok(d) = seek(pos, libc::SEEK_DATA) {
        let h = seek(d, libc::SEEK_HOLE).unwrap();
        out.push(format!("data {d}..{h}"));
        pos = h;
    }
    let s = size as i64;
    for off in [
        -1,
        0,
        1,
        4095,
        4096,
        65535,
        65536,
        (MIB / 2) as i64,
        MIB as i64 - 1,
        MIB as i64,
        s - 1,
        s,
        s + 1,
        s * 10,
    ] {
        out.push(format!(
            "{off}: data {:?} hole {:?}",
            seek(off, libc::SEEK_DATA),
            seek(off, libc::SEEK_HOLE)
        ));
    }
    out
}

/// Checks a `hole_map` against the content: every byte outside the data extents is zero,
/// and the extents end at the end of the file.
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

fn create_rw(fs: &KcacheFs, name: &str) -> (u64, u64) {
    let (attr, o) = fs
        .create(
            ROOT_INO,
            OsStr::new(name),
            0o644,
            libc::O_RDWR | libc::O_CREAT,
            ctx(),
            false,
            None,
        )
        .unwrap();
    (attr.ino, o.fh)
}

fn read_range(fs: &KcacheFs, fh: u64, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < len {
        let want = (len - out.len() as u64).min(1 << 20) as u32;
        let d = fs.read(fh, off + out.len() as u64, want).unwrap();
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    out
}

fn blob_file_blocks(fs: &KcacheFs, ino: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let h = fs.store().ns().get(ino).unwrap().blob.unwrap();
    std::fs::metadata(fs.store().blobs().blob_path(&h))
        .unwrap()
        .blocks()
}

/// Whether the temp directory's filesystem keeps holes (ext4, xfs, tmpfs, btrfs do); the
/// comparisons with it mean nothing where it does not.
fn native_has_holes(dir: &std::path::Path) -> bool {
    let f = std::fs::File::create(dir.join("probe")).unwrap();
    f.set_len(MIB).unwrap();
    let r = native_seek(&f)(0, libc::SEEK_HOLE) == Ok(0);
    if !r {
        eprintln!("skipping: {} keeps no holes", dir.display());
    }
    r
}

#[test]
fn sparse_content_keeps_its_holes_through_commit_dedup_and_copy_on_write() {
    let (_d, fs) = fs();
    if !native_has_holes(_d.path()) {
        return;
    }
    const SIZE: u64 = 100 * MIB;
    // One byte at the end of 100 MiB: one 4 KiB block (8 sectors) on disk. A filesystem
    // may add a few blocks of metadata; 100 MiB of zeros would be 204800.
    let small = |blocks: u64| blocks <= 64;
    let (a, w) = create_rw(&fs, "a");
    fs.write(w, SIZE - 1, b"x").unwrap();
    let staged = fs.getattr(a).unwrap();
    assert_eq!(staged.size, SIZE);
    assert!(small(staged.blocks), "staged: {} blocks", staged.blocks);
    fs.release(w).unwrap();
    let committed = fs.getattr(a).unwrap();
    assert!(small(committed.blocks), "committed: {committed:?}");
    assert!(small(blob_file_blocks(&fs, a)));
    assert_eq!(committed.blocks, blob_file_blocks(&fs, a));
    let s = fs.store().stats().unwrap();
    assert_eq!(s.stored_bytes, SIZE);
    assert!(s.disk_bytes <= 64 * 512, "{s:?}");

    // The same bytes under another name: one blob, both small.
    let (b, w) = create_rw(&fs, "b");
    fs.write(w, SIZE - 1, b"x").unwrap();
    fs.release(w).unwrap();
    assert_eq!(fs.store().stats().unwrap().blobs, 1);
    assert_eq!(fs.getattr(b).unwrap().blocks, committed.blocks);

    // Copy-on-write: changing one byte copies the blob into a staging file, holes kept.
    let w = fs.open(a, libc::O_RDWR, None).unwrap();
    fs.write(w.fh, 0, b"y").unwrap();
    let cow = fs.getattr(a).unwrap();
    assert!(small(cow.blocks), "copy-on-write staging file: {cow:?}");
    assert_eq!(
        hole_map(SIZE, fs_seek(&fs, w.fh))[..2],
        [
            "data 0..4096".to_string(),
            format!("data {}..{SIZE}", SIZE - 4096)
        ]
    );
    fs.release(w.fh).unwrap();
    let after = fs.getattr(a).unwrap();
    assert!(small(after.blocks), "after copy-on-write: {after:?}");
    assert!(small(blob_file_blocks(&fs, a)));
    let r = fs.open(a, libc::O_RDONLY, None).unwrap();
    assert_eq!(read_range(&fs, r.fh, 0, 2), b"y\0");
    assert_eq!(read_range(&fs, r.fh, SIZE / 2, 4096), vec![0u8; 4096]);
    assert_eq!(read_range(&fs, r.fh, SIZE - 2, 10), b"\0x");
    fs.release(r.fh).unwrap();
    let r = fs.open(b, libc::O_RDONLY, None).unwrap();
    assert_eq!(read_range(&fs, r.fh, 0, 1), b"\0");
    fs.release(r.fh).unwrap();
}

#[test]
fn seek_data_and_seek_hole_match_the_native_filesystem_staged_and_committed() {
    use std::os::unix::fs::FileExt;
    let (_d, fs) = fs();
    if !native_has_holes(_d.path()) {
        return;
    }
    let size = 2 * MIB + 100;
    let pieces: [(u64, &[u8]); 3] = [(0, b"0123456789"), (MIB, &[7u8; 5000]), (size - 1, b"e")];
    let native = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(_d.path().join("native"))
        .unwrap();
    let (ino, w) = create_rw(&fs, "f");
    for (off, data) in pieces {
        native.write_all_at(data, off).unwrap();
        fs.write(w, off, data).unwrap();
    }
    let want = hole_map(size, native_seek(&native));
    assert!(want.len() > 14 + 1, "the native file has holes: {want:?}");
    assert_eq!(hole_map(size, fs_seek(&fs, w)), want, "staged");
    assert_eq!(fs.getattr(ino).unwrap().blocks, {
        use std::os::unix::fs::MetadataExt;
        native.metadata().unwrap().blocks()
    });
    fs.release(w).unwrap();
    let r = fs.open(ino, libc::O_RDONLY, None).unwrap();
    assert_eq!(hole_map(size, fs_seek(&fs, r.fh)), want, "committed");
    // Only SEEK_DATA and SEEK_HOLE are the daemon's; the kernel does the others.
    assert_eq!(fs.lseek(r.fh, 0, libc::SEEK_SET), Err(Errno::EINVAL));
    fs.release(r.fh).unwrap();
    assert_eq!(fs.lseek(r.fh, 0, libc::SEEK_DATA), Err(Errno::EBADF));

    // An empty file has no data anywhere, and no hole either (ENXIO at 0, as ext4).
    let (_, w) = create_rw(&fs, "empty");
    assert_eq!(fs.lseek(w, 0, libc::SEEK_DATA), Err(Errno(libc::ENXIO)));
    assert_eq!(fs.lseek(w, 0, libc::SEEK_HOLE), Err(Errno(libc::ENXIO)));
    fs.release(w).unwrap();
}

#[test]
fn fallocate_modes_match_the_native_filesystem() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::os::unix::io::AsRawFd;
    let (d, fs) = fs();
    if !native_has_holes(d.path()) {
        return;
    }
    const K: u64 = 1024;
    let base = |f: &dyn Fn(u64, &[u8])| {
        f(0, &vec![0xAB; (256 * K) as usize]);
        f(768 * K, &vec![0xCD; (256 * K) as usize]);
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
        let native = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join(format!("native{i}")))
            .unwrap();
        base(&|o, b| native.write_all_at(b, o).unwrap());
        let r = unsafe { libc::fallocate(native.as_raw_fd(), mode, off as i64, len as i64) };
        assert_eq!(r, 0, "{what} on the native file: errno {}", errno());
        let nsize = native.metadata().unwrap().len();
        let mut ncontent = vec![0u8; nsize as usize];
        native.read_exact_at(&mut ncontent, 0).unwrap();

        // Committed first, so the change goes through a copy-on-write staging file.
        let (ino, w) = create_rw(&fs, &format!("f{i}"));
        base(&|o, b| {
            fs.write(w, o, b).unwrap();
        });
        fs.release(w).unwrap();
        let w = fs.open(ino, libc::O_RDWR, None).unwrap();
        fs.fallocate(w.fh, off, len, mode).unwrap();
        let a = fs.getattr(ino).unwrap();
        assert_eq!(a.size, nsize, "{what}: size");
        // While staged, ext4's answers also depend on what is written back yet (its
        // delayed allocation), which differs between the two files: what must hold is that
        // the staging file's map is right for its content (compared exactly below, once
        // both are on disk).
        let staged = hole_map(nsize, fs_seek(&fs, w.fh));
        assert_eq!(read_range(&fs, w.fh, 0, nsize + 1), ncontent, "{what}");
        assert_map_fits(&staged, &ncontent, what);
        // Committed (durably, so nothing is left to write back), then compared with the
        // native file on disk, both with their cached pages dropped: ext4 counts cached
        // pages over preallocated (unwritten) ranges as data.
        fs.fsync(w.fh).unwrap();
        fs.release(w.fh).unwrap();
        native.sync_all().unwrap();
        let blob = std::fs::File::open(
            fs.store()
                .blobs()
                .blob_path(&fs.store().ns().get(ino).unwrap().blob.unwrap()),
        )
        .unwrap();
        for f in [&native, &blob] {
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0);
        }
        let nmap = hole_map(nsize, native_seek(&native));
        let r = fs.open(ino, libc::O_RDONLY, None).unwrap();
        assert_eq!(
            hole_map(nsize, fs_seek(&fs, r.fh)),
            nmap,
            "{what}: committed"
        );
        assert_eq!(read_range(&fs, r.fh, 0, nsize + 1), ncontent, "{what}");
        let blocks = fs.getattr(ino).unwrap().blocks;
        assert_eq!(blocks, blob_file_blocks(&fs, ino), "{what}: committed");
        if mode != libc::FALLOC_FL_KEEP_SIZE {
            assert_eq!(blocks, native.metadata().unwrap().blocks(), "{what}");
        } // else the content is the base's: its blob, without the preallocation, is used.
        fs.release(r.fh).unwrap();
        assert_eq!(
            fs.getattr(ino).unwrap().size,
            nsize,
            "{what}: committed size"
        );
    }
    // Modes ext4 does not have are refused before anything is staged.
    let (ino, w) = create_rw(&fs, "other");
    fs.write(w, 0, b"abc").unwrap();
    fs.release(w).unwrap();
    let w = fs.open(ino, libc::O_RDWR, None).unwrap();
    const UNSHARE_RANGE: i32 = 0x40;
    assert_eq!(
        fs.fallocate(w.fh, 0, 4096, UNSHARE_RANGE),
        Err(Errno(libc::EOPNOTSUPP))
    );
    fs.release(w.fh).unwrap();
    assert_eq!(read_all(&fs, ino), b"abc");
}

#[test]
fn blocks_of_blobs_committed_before_schema_5_fall_back_to_the_size() {
    // Rows from before migration 5 have no measured allocation: st_blocks is then the size
    // rounded up to 512-byte sectors, as every file reported before.
    let (d, fs) = fs();
    let (ino, w) = create_rw(&fs, "old");
    fs.write(w, 10 * MIB - 1, b"x").unwrap();
    fs.release(w).unwrap();
    let db = rusqlite::Connection::open(d.path().join("kcache.db")).unwrap();
    db.execute("UPDATE blobs SET blocks = NULL", []).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().blocks, 10 * MIB / 512);
    assert_eq!(fs.store().stats().unwrap().disk_bytes, 10 * MIB);
    // A new commit of the same content measures it again.
    let (other, w) = create_rw(&fs, "new");
    fs.write(w, 10 * MIB - 1, b"x").unwrap();
    fs.release(w).unwrap();
    assert!(fs.getattr(other).unwrap().blocks <= 64);
    assert!(fs.getattr(ino).unwrap().blocks <= 64);
}

#[test]
fn eviction_under_database_errors_never_takes_an_open_file() {
    use kcache_store::{Fault, Step};
    let (_d, fs) = fs();
    let held = write_file(&fs, ROOT_INO, "held", b"an open file's bytes");
    let other = write_file(&fs, ROOT_INO, "other", b"nobody holds this");
    let o = fs.open(held, libc::O_RDONLY, None).unwrap();
    // Every read of an inode's row fails: "is this blob in use" cannot be answered.
    fs.store()
        .faults()
        .always(Step::ReadInode, Fault::Errno(libc::EIO));
    // An open file whose row cannot be read might hold any blob: nothing is evicted.
    assert_eq!(fs.evict_to(0).unwrap(), (0, 0));
    fs.store().faults().clear();
    assert_eq!(fs.read(o.fh, 0, 100).unwrap(), b"an open file's bytes");
    // With the database back, the closed file goes and the open one stays.
    assert_eq!(fs.evict_to(0).unwrap().0, 1);
    assert_eq!(fs.read(o.fh, 0, 100).unwrap(), b"an open file's bytes");
    fs.release(o.fh).unwrap();
    assert_eq!(
        read_all(&fs, held),
        b"an open file's bytes",
        "the open file survived"
    );
    assert_eq!(
        fs.getattr(other).unwrap_err(),
        Errno::ENOENT,
        "the closed one was evicted"
    );
    let s = fs.store().stats().unwrap();
    assert_eq!((s.files, s.blobs), (1, 1));
}

#[test]
fn release_under_database_errors_keeps_dirty_staged_content() {
    use kcache_store::{Fault, Step};
    let (_d, fs) = fs();
    let (attr, o) = fs
        .create(
            ROOT_INO,
            OsStr::new("f"),
            0o644,
            libc::O_WRONLY | libc::O_CREAT,
            ctx(),
            false,
            None,
        )
        .unwrap();
    fs.write(o.fh, 0, b"dirty data nobody committed yet")
        .unwrap();
    let faults = fs.store().faults();
    faults.always(Step::DbCommit, Fault::Errno(libc::EIO));
    faults.always(Step::ReadInode, Fault::Errno(libc::EIO));
    let e = fs.release(o.fh).unwrap_err();
    assert_eq!(e, Errno::EIO, "the failed commit is reported");
    faults.clear();
    // The unmount commits what is still staged.
    fs.flush_all();
    assert_eq!(read_all(&fs, attr.ino), b"dirty data nobody committed yet");
    assert!(fs.store().blobs().verify(|_, _| {}).unwrap().is_clean());
}

#[test]
fn a_commit_whose_transaction_fails_is_retried_from_the_same_staged_bytes() {
    use kcache_store::{Fault, Step};
    let (_d, fs) = fs();
    let (ino, w) = create_rw(&fs, "f");
    fs.write(w, 0, b"content whose first commit fails").unwrap();
    // The blob file is installed, then the transaction fails: the file must go back to
    // staging, or the retry has nothing to commit.
    fs.store()
        .faults()
        .always(Step::DbCommit, Fault::Errno(libc::EIO));
    assert_eq!(fs.release(w).unwrap_err(), Errno::EIO);
    fs.store().faults().clear();
    fs.flush_all();
    assert_eq!(read_all(&fs, ino), b"content whose first commit fails");
    let v = fs.store().blobs().verify(|_, _| {}).unwrap();
    assert!(v.is_clean() && v.stray_removed == 0, "{v:?}");
}

/// Copies an upstream directory (blobs, manifests, tags).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Two filesystems (two mounts' volumes) of one store with different upstreams: each
/// fetches from its own, whichever was set last; a sibling given none fetches nothing. File
/// p's blob is only on upstream A, q's only on B; both volumes hold both files.
#[test]
fn each_filesystem_fetches_from_its_own_upstreams() {
    use kcache_store::{FetchConfig, Remote, Upstream};
    let dir = tempfile::tempdir().unwrap();
    let (p_data, q_data): (Vec<u8>, Vec<u8>) = (
        (0..300_000u32).map(|i| (i % 251) as u8).collect(),
        (0..300_000u32).map(|i| (i % 241) as u8).collect(),
    );
    let (up_a, up_b) = (dir.path().join("up-a"), dir.path().join("up-b"));
    let url_a = format!("file://{}", up_a.display());
    let url_b = format!("file://{}", up_b.display());
    {
        let store = Arc::new(Store::open(&dir.path().join("a")).unwrap());
        let vol = store.volume("default", true, 0, 0).unwrap();
        let fs = KcacheFs::new(store.clone(), vol, false);
        write_file(&fs, ROOT_INO, "p", &p_data);
        write_file(&fs, ROOT_INO, "q", &q_data);
        store
            .push(
                &Upstream::parse(&url_a).unwrap(),
                "default",
                "default",
                None,
                &mut |_| {},
            )
            .unwrap();
    }
    copy_dir(&up_a, &up_b);
    let remote = |url: &str| {
        Arc::new(Remote::new(vec![Upstream::parse(url).unwrap()], FetchConfig::default()).unwrap())
    };
    let store = Arc::new(Store::open(&dir.path().join("b")).unwrap());
    for v in ["one", "two"] {
        store.pull(&remote(&url_a), "default", v, &[]).unwrap();
    }
    let blob_of = |name: &[u8]| {
        let v = store.volume("one", false, 0, 0).unwrap();
        let h = store.ns().lookup(v.root, name).unwrap().blob.unwrap();
        let hex = h.to_hex();
        format!("blobs/{}/{hex}", &hex[..2])
    };
    std::fs::remove_file(up_a.join(blob_of(b"q"))).unwrap();
    std::fs::remove_file(up_b.join(blob_of(b"p"))).unwrap();

    let one = KcacheFs::new(
        store.clone(),
        store.volume("one", false, 0, 0).unwrap(),
        false,
    )
    .with_remote(Some(remote(&url_a)));
    // Made after `one`, as a later mount is: its upstreams must not become `one`'s.
    let two = one
        .sibling(store.volume("two", false, 0, 0).unwrap(), false)
        .with_remote(Some(remote(&url_b)));
    let none = one.sibling(store.volume("one", false, 0, 0).unwrap(), false);
    assert!(none.remote().is_none(), "a sibling inherited upstreams");
    let ino = |fs: &KcacheFs, name: &str| fs.lookup(ROOT_INO, OsStr::new(name)).unwrap().ino;
    // Without upstreams an open may succeed (the blob file is opened at the first read);
    // the read fails then.
    let open_err = |fs: &KcacheFs, name: &str| {
        let o = fs.open(ino(fs, name), libc::O_RDONLY, None)?;
        let res = fs.read(o.fh, 0, 1 << 20);
        fs.release(o.fh).unwrap();
        res.map(drop)
    };

    assert_eq!(
        open_err(&none, "p").unwrap_err(),
        Errno::EIO,
        "fetched with no upstreams"
    );
    assert_eq!(
        open_err(&one, "q").unwrap_err(),
        Errno::EIO,
        "one fetched q from B's upstreams"
    );
    assert_eq!(
        open_err(&two, "p").unwrap_err(),
        Errno::EIO,
        "two fetched p from A's upstreams"
    );
    assert!(read_all(&one, ino(&one, "p")) == p_data);
    assert!(read_all(&two, ino(&two, "q")) == q_data);
    // The blobs are the store's: local now for every volume.
    assert!(read_all(&one, ino(&one, "q")) == q_data);
    assert!(read_all(&two, ino(&two, "p")) == p_data);
    assert!(read_all(&none, ino(&none, "p")) == p_data);
}

/// An open that joins a download another filesystem started from its own upstreams, and
/// that fails there (a hung upstream, given up after its bound), is not failed with it: it
/// fetches from its own filesystem's upstreams. The other filesystem's open fails (EIO).
#[test]
fn an_open_that_joined_another_filesystems_failed_download_fetches_from_its_own() {
    use kcache_store::{FetchConfig, Remote, Upstream};
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 239) as u8).collect();
    let up = dir.path().join("up");
    let url = format!("file://{}", up.display());
    {
        let store = Arc::new(Store::open(&dir.path().join("a")).unwrap());
        let vol = store.volume("default", true, 0, 0).unwrap();
        let fs = KcacheFs::new(store.clone(), vol, false);
        write_file(&fs, ROOT_INO, "f", &data);
        store
            .push(
                &Upstream::parse(&url).unwrap(),
                "default",
                "default",
                None,
                &mut |_| {},
            )
            .unwrap();
    }
    let remote = |url: &str, secs| {
        let config = FetchConfig {
            timeout: std::time::Duration::from_secs(secs),
        };
        Arc::new(Remote::new(vec![Upstream::parse(url).unwrap()], config).unwrap())
    };
    let store = Arc::new(Store::open(&dir.path().join("b")).unwrap());
    for v in ["one", "two"] {
        store.pull(&remote(&url, 30), "default", v, &[]).unwrap();
    }
    let v = store.volume("one", false, 0, 0).unwrap();
    let h = store.ns().lookup(v.root, b"f").unwrap().blob.unwrap();
    // Accepts connections (the backlog), never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("http://{}", hung.local_addr().unwrap());
    let one = KcacheFs::new(store.clone(), v, false).with_remote(Some(remote(&hung_url, 2)));
    let two = one
        .sibling(store.volume("two", false, 0, 0).unwrap(), false)
        .with_remote(Some(remote(&url, 30)));
    let ino = |fs: &KcacheFs| fs.lookup(ROOT_INO, OsStr::new("f")).unwrap().ino;
    let (ino_one, ino_two) = (ino(&one), ino(&two));
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            one.open(ino_one, libc::O_RDONLY, None)
                .map(|o| one.release(o.fh).unwrap())
        });
        let t = std::time::Instant::now();
        while !store.is_fetching(&h) {
            assert!(t.elapsed().as_secs() < 10, "one's download never started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let t = std::time::Instant::now();
        assert!(read_all(&two, ino_two) == data, "two: wrong bytes");
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(1500),
            "read at once: one's download was not joined ({:?})",
            t.elapsed()
        );
        assert_eq!(first.join().unwrap(), Err(Errno::EIO), "one: the hung open");
    });
    assert!(read_all(&one, ino_one) == data, "one: local now");
}

/// Records what the filesystem asks the kernel to forget.
#[derive(Default)]
struct Recorder {
    pages: std::sync::Mutex<Vec<u64>>,
}

impl kcache_fs::KernelCache for Recorder {
    fn name_gone(&self, _parent: u64, _name: &OsStr, _ino: u64) {}
    fn attrs_changed(&self, _ino: u64) {}
    fn pages_changed(&self, ino: u64) {
        self.pages.lock().unwrap().push(ino);
    }
}

#[test]
fn the_last_direct_writer_closing_under_other_handles_drops_the_kernels_pages() {
    let (_d, fs) = fs();
    let rec = Arc::new(Recorder::default());
    fs.set_kernel_cache(rec.clone());
    let pages = || rec.pages.lock().unwrap().clone();
    let settle = || {
        // Sent from a thread of its own.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pages().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    // A writer alone: nobody can hold stale pages, nothing to drop.
    let ino = write_file(&fs, ROOT_INO, "alone", b"one");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(pages(), Vec::<u64>::new());

    // A reader (direct, so it may map the file) open across an O_WRONLY writer's writes.
    let w = fs.open(ino, libc::O_WRONLY, None).unwrap();
    assert!(matches!(w.mode, IoMode::Direct { keep_cache: false }));
    let r = fs.open(ino, libc::O_RDONLY, None).unwrap();
    assert!(matches!(r.mode, IoMode::Direct { keep_cache: true }));
    fs.write(w.fh, 0, b"two").unwrap();
    fs.release(w.fh).unwrap();
    settle();
    assert_eq!(pages(), vec![ino]);
    assert_eq!(fs.read(r.fh, 0, 16).unwrap(), b"two");
    fs.release(r.fh).unwrap();

    // An O_RDWR writer goes through the page cache, which its writes keep current.
    rec.pages.lock().unwrap().clear();
    let w = fs.open(ino, libc::O_RDWR, None).unwrap();
    assert!(matches!(w.mode, IoMode::Cached { .. }));
    let r = fs.open(ino, libc::O_RDONLY, None).unwrap();
    fs.write(w.fh, 0, b"six").unwrap();
    fs.release(w.fh).unwrap();
    fs.release(r.fh).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(pages(), Vec::<u64>::new());
}

#[test]
fn a_create_failing_after_its_open_leaves_no_handle_behind() {
    use kcache_store::{Fault, Step};
    let (_d, fs) = fs();
    let create = |name: &str| create_wo(&fs, ROOT_INO, name);
    // The steps of one create, to fail the last inode read of the next: the one after the
    // open, when a handle is already counted.
    let faults = fs.store().faults();
    faults.record();
    let (_, o) = create("probe").unwrap();
    let steps = faults.recorded();
    fs.release(o.fh).unwrap();
    let last = steps
        .iter()
        .rposition(|s| *s == Step::ReadInode)
        .expect("a create reads an inode row");
    faults.at(last as u64, Fault::Errno(libc::EIO));
    assert_eq!(create("f").unwrap_err(), Errno::EIO);
    faults.clear();
    // Had the O_WRONLY (direct) handle stayed counted, every later writer would be direct.
    let ino = fs.lookup(ROOT_INO, OsStr::new("f")).unwrap().ino;
    let w = fs.open(ino, libc::O_RDWR, None).unwrap();
    assert!(matches!(w.mode, IoMode::Cached { .. }), "{:?}", w.mode);
    fs.release(w.fh).unwrap();
}

/// CI once saw `cat` of a file held open through a lazily detached mount fail with EIO: the
/// reader had opened while the writer's RELEASE (sent in the background) was still on its
/// way, so it was served by the daemon, not by passthrough; the writer's close then committed
/// the file, and the reader's first read opened the blob by path after the store's directory
/// had gone. A reader open across a commit keeps reading the committed bytes without opening
/// the blob again.
#[test]
fn a_reader_open_across_the_commit_reads_without_reopening_the_blob() {
    let (_d, fs) = fs();
    let (attr, w) = create_wo(&fs, ROOT_INO, "held").unwrap();
    fs.write(w.fh, 0, b"held open").unwrap();
    let r = fs.open(attr.ino, libc::O_RDONLY, None).unwrap();
    assert!(matches!(r.mode, IoMode::Direct { .. }), "{:?}", r.mode);
    fs.release(w.fh).unwrap();
    let h = fs.store().ns().get(attr.ino).unwrap().blob.unwrap();
    std::fs::remove_file(fs.store().blobs().blob_path(&h)).unwrap();
    assert_eq!(fs.read(r.fh, 0, 100).unwrap(), b"held open");
    fs.release(r.fh).unwrap();
}

/// An fsync of a file whose content was committed at its last close (into the open group
/// commit, without a sync) answered at once with nothing done, so a crash soon after could
/// lose what it had promised. It now syncs the blob file and its name, then the database.
#[test]
fn fsync_of_a_file_committed_at_close_syncs_its_blob_and_the_database() {
    use kcache_store::Step;
    let (_d, fs) = fs();
    let ino = write_file(&fs, ROOT_INO, "f", b"committed at close");
    let o = fs.open(ino, libc::O_RDONLY, None).unwrap();
    let faults = fs.store().faults();
    faults.record();
    fs.fsync(o.fh).unwrap();
    let steps = faults.recorded();
    fs.release(o.fh).unwrap();
    assert!(steps.contains(&Step::SyncData), "{steps:?}");
    assert!(steps.contains(&Step::SyncDir), "{steps:?}");
    // An empty file has no blob to sync; its fsync still succeeds.
    let e = write_file(&fs, ROOT_INO, "empty", b"");
    let o = fs.open(e, libc::O_RDONLY, None).unwrap();
    fs.fsync(o.fh).unwrap();
    fs.release(o.fh).unwrap();
}

/// An fsync of a file truncated to nothing has no blob to carry its commit to the disk: the
/// database must be synced all the same (SQLite in rollback-journal mode commits by truncating
/// its journal and fsyncing it; a journal that came back after a power loss would undo a
/// committed transaction). Seen from another connection, which sees only committed groups.
#[test]
fn fsync_of_a_file_emptied_commits_and_syncs_the_change() {
    let (dir, fs) = fs();
    let ino = write_file(&fs, ROOT_INO, "journal", b"hot journal");
    // Another file keeps the content: a blob freed would commit the group on its own.
    write_file(&fs, ROOT_INO, "keeper", b"hot journal");
    // A group that only this test (or an fsync) commits.
    fs.store()
        .start_group_commit(std::time::Duration::from_secs(3600));
    let reader = Store::open_with(
        dir.path(),
        &kcache_store::OpenOptionsStore { read_only: true },
    )
    .unwrap();
    // Written, then truncated to nothing through the open file (staged, and empty).
    let o = fs.open(ino, libc::O_RDWR, None).unwrap();
    fs.write(o.fh, 0, b"more").unwrap();
    let a = kcache_fs::SetAttrIn {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(fs.setattr(ino, &a).unwrap().size, 0);
    fs.fsync(o.fh).unwrap();
    assert_eq!(
        reader.ns().get(ino).unwrap().size,
        0,
        "fsync returned before the emptied content was committed"
    );
    fs.release(o.fh).unwrap();
}

/// Staged bytes of a file whose last name went while it was open are deleted at its last
/// close, but not before that unlink is committed: a crash that loses the unlink brings the
/// name back, and it must come back with what was written (possibly long before), not with
/// older content.
#[test]
fn staged_bytes_of_a_file_unlinked_while_open_outlive_the_uncommitted_unlink() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let vol = store.volume("default", true, 0, 0).unwrap();
    // A group that only this test commits.
    store.start_group_commit(std::time::Duration::from_secs(3600));
    let fs = KcacheFs::new(store.clone(), vol, false);
    let ino = write_file(&fs, ROOT_INO, "f", b"old");
    // Another file holds the same content, so purging f frees no blob (which would commit
    // the group, unlink included, before deleting the blob file).
    write_file(&fs, ROOT_INO, "g", b"old");
    let staging = || {
        std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .count()
    };
    // The first commits' staging files wait for their group too.
    assert_eq!(staging(), 2);
    store.commit_group().unwrap();
    assert_eq!(staging(), 0);
    let w = fs.open(ino, libc::O_RDWR, None).unwrap();
    fs.write(w.fh, 0, b"written while open").unwrap();
    assert_eq!(staging(), 1);
    fs.unlink(ROOT_INO, OsStr::new("f")).unwrap();
    fs.release(w.fh).unwrap();
    assert_eq!(
        staging(),
        1,
        "staged bytes went before the unlink was committed"
    );
    store.commit_group().unwrap();
    assert_eq!(
        staging(),
        0,
        "staged bytes of an unlinked file outlived its commit"
    );
    fs.forget(ino, 1);
}
