//! A merge pull into a filesystem in use, driven as the kernel would drive it: a file the
//! merge replaces keeps its content for the handles open on it, and lives on while the kernel
//! still knows the inode (it may open it again through an entry it cached before it was told),
//! going once the kernel forgets it.

use std::ffi::OsStr;
use std::sync::Arc;

use kcache_fs::{Ctx, KcacheFs, ROOT_INO};
use kcache_store::{FetchConfig, Kind, NewNode, Remote, Staged, Store, Upstream};

fn remote(dir: &std::path::Path) -> Remote {
    let up = Upstream::parse(&format!("file://{}", dir.join("up").display())).unwrap();
    Remote::new(vec![up], FetchConfig::default()).unwrap()
}

/// A store `a` publishing tag "t": c = "theirs", d = "their d", n = "new".
fn publish(dir: &std::path::Path) {
    let a = Store::open(&dir.join("a")).unwrap();
    let va = a.volume("default", true, 0, 0).unwrap();
    for (name, content) in [("c", "theirs"), ("d", "their d"), ("n", "new")] {
        let node = NewNode {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        };
        let f = a.ns().create(va.root, name.as_bytes(), &node).unwrap();
        let (file, path) = a.blobs().new_staging().unwrap();
        std::io::Write::write_all(&mut &file, content.as_bytes()).unwrap();
        let st = Staged {
            ino: f.ino,
            path: &path,
            file: &file,
            known: None,
            durable: false,
            mtime: 1,
        };
        a.blobs().commit_staged(&st).unwrap();
    }
    let up = Upstream::parse(&format!("file://{}", dir.join("up").display())).unwrap();
    a.push(&up, "default", "t", None, &mut |_| {}).unwrap();
}

fn write_file(fs: &KcacheFs, name: &str, data: &[u8]) -> u64 {
    let ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
    };
    let (attr, o) = fs
        .create(
            ROOT_INO,
            OsStr::new(name),
            0o644,
            libc::O_WRONLY | libc::O_CREAT,
            ctx,
            false,
            None,
        )
        .unwrap();
    fs.write(o.fh, 0, data).unwrap();
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
fn a_replaced_file_lives_while_open_or_known_to_the_kernel() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path());
    let store = Arc::new(Store::open(&d.path().join("b")).unwrap());
    let vol = store.volume("default", true, 0, 0).unwrap();
    let fs = KcacheFs::new(store.clone(), vol, false).with_remote(Some(Arc::new(remote(d.path()))));
    let c = write_file(&fs, "c", b"ours");
    let dd = write_file(&fs, "d", b"our d");
    // The kernel forgot d (one lookup, from create); it still knows c and has it open.
    fs.forget(dd, 1);
    let held = fs.open(c, libc::O_RDONLY, None).unwrap();

    let r = fs.pull_merge(&remote(d.path()), "t", &[], true).unwrap();
    assert_eq!((r.added, r.updated, r.kept), (1, 2, 0), "{r:?}");
    assert!(
        store.ns().get(dd).is_err(),
        "a replaced file nothing holds goes at once"
    );
    assert_eq!(fs.read(held.fh, 0, 100).unwrap(), b"ours");
    fs.release(held.fh).unwrap();
    // Closed, but the kernel may still open it by what it cached: it stays, nameless.
    assert_eq!(store.ns().get(c).unwrap().nlink, 0);
    assert_eq!(read_all(&fs, c), b"ours");
    let new = fs.lookup(ROOT_INO, OsStr::new("c")).unwrap();
    assert_ne!(new.ino, c);
    assert_eq!(read_all(&fs, new.ino), b"theirs");
    let n = fs.lookup(ROOT_INO, OsStr::new("n")).unwrap();
    assert_eq!(read_all(&fs, n.ino), b"new");
    // Once the kernel forgets it, it goes.
    fs.forget(c, 1);
    assert!(store.ns().get(c).is_err(), "purged once forgotten");
    assert!(store.blobs().verify(|_, _| {}).unwrap().is_clean());
}
