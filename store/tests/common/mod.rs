//! Helpers shared by the store's integration tests.

// Each test binary uses some of them.
#![allow(dead_code)]

use kcache_store::{Kind, NewNode, Staged, Store};

pub fn node(kind: Kind) -> NewNode {
    NewNode {
        kind,
        mode: 0o644,
        uid: 1,
        gid: 2,
        rdev: 0,
        target: None,
    }
}

/// A new store in a temporary directory, with its default volume's root inode.
pub fn store_with_root() -> (tempfile::TempDir, Store, u64) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    (dir, s, root)
}

/// What a closed writer hands to `commit_staged` for `file` at `path`: hash unknown, not
/// durable.
pub fn staged<'a>(ino: u64, path: &'a std::path::Path, file: &'a std::fs::File) -> Staged<'a> {
    Staged {
        ino,
        path,
        file,
        known: None,
        durable: false,
        mtime: 1,
    }
}

/// A staging file armed for inode `ino`, holding `content`.
pub fn armed(store: &Store, ino: u64, content: &[u8]) -> (std::fs::File, std::path::PathBuf) {
    let (file, path) = store.blobs().new_armed_staging(ino).unwrap();
    std::io::Write::write_all(&mut &file, content).unwrap();
    (file, path)
}

/// Gives inode `ino` the content `content`, as a closed writer's commit does (which also
/// retires the staging file).
pub fn commit(store: &Store, ino: u64, content: &[u8]) {
    let (file, path) = store.blobs().new_staging().unwrap();
    std::io::Write::write_all(&mut &file, content).unwrap();
    let (_, size) = store
        .blobs()
        .commit_staged(&staged(ino, &path, &file))
        .unwrap();
    assert_eq!(size, content.len() as u64);
}

/// Four stores, each with a tree of its own (`pN/file-i`) and a file all of them have
/// (`common`), push to `tag` on `up` at once, each after a random pause of up to `jitter_ms`;
/// then a fifth store pulls the tag. Panics unless the pull has every file of all four, each
/// naming the right content.
pub fn four_pushers_one_tag(up: &kcache_store::Upstream, tag: &str, jitter_ms: u64) {
    use std::sync::{Arc, Barrier};

    const FILES: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let content = |p: usize, i: usize| format!("pusher {p} file {i}").into_bytes();
    let threads: Vec<_> = (0..4)
        .map(|p| {
            let (up, tag, barrier) = (up.clone(), tag.to_owned(), barrier.clone());
            let root = dir.path().join(format!("pusher{p}"));
            std::thread::spawn(move || {
                let s = Store::open(&root).unwrap();
                let v = s.volume("default", true, 0, 0).unwrap();
                let d = s
                    .ns()
                    .create(v.root, format!("p{p}").as_bytes(), &node(Kind::Dir))
                    .unwrap();
                for i in 0..FILES {
                    let f = s
                        .ns()
                        .create(d.ino, format!("file-{i}").as_bytes(), &node(Kind::File))
                        .unwrap();
                    commit(&s, f.ino, &content(p, i));
                }
                let c = s.ns().create(v.root, b"common", &node(Kind::File)).unwrap();
                commit(&s, c.ino, format!("common from {p}").as_bytes());
                barrier.wait();
                let pause = (seed.wrapping_mul(p as u64 * 2654435761 + 7) >> 5) % (jitter_ms + 1);
                std::thread::sleep(std::time::Duration::from_millis(pause));
                s.push(&up, "default", &tag, None, &mut |_| {})
                    .unwrap_or_else(|e| panic!("pusher {p}: {e}"));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let puller = Store::open(&dir.path().join("puller")).unwrap();
    let remote = kcache_store::Remote::new(vec![up.clone()], Default::default()).unwrap();
    puller.pull(&remote, tag, "default", &[]).unwrap();
    let root = puller.volume("default", false, 0, 0).unwrap().root;
    for p in 0..4 {
        let d = puller
            .ns()
            .lookup(root, format!("p{p}").as_bytes())
            .unwrap_or_else(|e| panic!("tag {tag}: pusher {p}'s tree is missing: {e}"));
        for i in 0..FILES {
            let f = puller
                .ns()
                .lookup(d.ino, format!("file-{i}").as_bytes())
                .unwrap_or_else(|e| panic!("tag {tag}: p{p}/file-{i} is missing: {e}"));
            assert_eq!(
                f.blob.unwrap().to_hex(),
                blake3::hash(&content(p, i)).to_hex().to_string(),
                "tag {tag}: p{p}/file-{i} names other content"
            );
        }
    }
    // `common` is one pusher's, whole.
    let c = puller
        .ns()
        .lookup(root, b"common")
        .unwrap()
        .blob
        .unwrap()
        .to_hex();
    assert!(
        (0..4).any(|p| c
            == blake3::hash(format!("common from {p}").as_bytes())
                .to_hex()
                .to_string()),
        "tag {tag}: common names content no pusher had"
    );
    assert!(puller.blobs().verify(|_, _| {}).unwrap().is_clean());
}
