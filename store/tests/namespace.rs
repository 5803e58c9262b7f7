//! The store without any filesystem on top: namespace transactions, reference counts,
//! schema refusal and recovery.

mod common;

use common::{commit, node, store_with_root};
use kcache_store::{Error, Kind, Store};

#[test]
fn rename_link_unlink_keep_counts_exact() {
    let (dir, s, root) = store_with_root();
    let d = s.ns().create(root, b"d", &node(Kind::Dir)).unwrap();
    assert_eq!(s.ns().get(root).unwrap().nlink, 3);
    let a = s.ns().create(root, b"a", &node(Kind::File)).unwrap();
    commit(&s, a.ino, b"shared content");
    let b = s.ns().create(d.ino, b"b", &node(Kind::File)).unwrap();
    commit(&s, b.ino, b"shared content");
    assert_eq!(s.stats().unwrap().blobs, 1);
    assert!(matches!(
        s.ns().create(root, b"a", &node(Kind::File)),
        Err(Error::Exists)
    ));

    // Hard link, then rename over it: same inode, nothing happens.
    s.ns().link(a.ino, d.ino, b"a2").unwrap();
    assert_eq!(s.ns().get(a.ino).unwrap().nlink, 2);
    assert!(s
        .ns()
        .rename(root, b"a", d.ino, b"a2", false, false)
        .unwrap()
        .replaced
        .is_none());
    // Rename b over a2: a loses a name, b moves.
    let r = s
        .ns()
        .rename(d.ino, b"b", d.ino, b"a2", false, false)
        .unwrap();
    assert_eq!(r.replaced, Some((a.ino, 1)));
    assert_eq!(s.ns().lookup(d.ino, b"a2").unwrap().ino, b.ino);
    // Directory cycles and non-empty targets are refused.
    let e = s.ns().create(d.ino, b"e", &node(Kind::Dir)).unwrap();
    assert!(matches!(
        s.ns().rename(root, b"d", e.ino, b"x", false, false),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        s.ns().rename(d.ino, b"e", root, b"d", false, false),
        Err(Error::NotEmpty)
    ));
    assert!(matches!(s.ns().rmdir(root, b"d"), Err(Error::NotEmpty)));
    // Exchange swaps a directory and a file across parents and fixes parent link counts.
    s.ns().rename(d.ino, b"e", root, b"a", false, true).unwrap();
    assert_eq!(s.ns().lookup(root, b"a").unwrap().kind, Kind::Dir);
    assert_eq!(s.ns().lookup(d.ino, b"e").unwrap().kind, Kind::File);
    assert_eq!(s.ns().get(root).unwrap().nlink, 4);
    assert_eq!(s.ns().get(d.ino).unwrap().nlink, 2);

    // Dropping every name and purging frees the blob and its file.
    let (ino, n) = s.ns().unlink(d.ino, b"e").unwrap();
    assert_eq!(n, 0);
    s.ns().purge(ino).unwrap();
    assert_eq!(s.stats().unwrap().blobs, 1);
    let (ino, n) = s.ns().unlink(d.ino, b"a2").unwrap();
    assert_eq!(n, 0);
    s.ns().purge(ino).unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.blobs, st.stored_bytes), (0, 0));
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .count(),
        0
    );
}

#[test]
fn one_owner_and_recovery_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(Error::Locked { .. })));
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    commit(&s, f.ino, b"gone after reopen");
    // Unlinked while "open" (never purged), and a staging file left by a crash.
    s.ns().unlink(root, b"f").unwrap();
    let (_file, leftover) = s.blobs().new_staging().unwrap();
    drop(s);
    let s = Store::open(dir.path()).unwrap();
    assert!(!leftover.exists());
    assert!(matches!(s.ns().get(f.ino), Err(Error::NotFound)));
    assert_eq!(s.stats().unwrap().blobs, 0);
    assert!(s.blobs().verify(|_, _| {}).unwrap().is_clean());
}

#[test]
fn eviction_follows_lru_order_across_reopen_and_removes_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut inos = Vec::new();
    {
        let s = Store::open(dir.path()).unwrap();
        let root = s.volume("default", true, 0, 0).unwrap().root;
        for name in [b"a", b"b", b"c"] {
            let n = s.ns().create(root, name, &node(Kind::File)).unwrap();
            commit(&s, n.ino, &[name[0]; 1000]);
            inos.push(n.ino);
        }
        // A second name for b's content: eviction must remove both.
        let b2 = s.ns().create(root, b"b2", &node(Kind::File)).unwrap();
        commit(&s, b2.ino, &[b'b'; 1000]);
        // Commits count as accesses: the order is a, b, c, then b again (b2). Reading a makes
        // it the most recent; dropping the store writes that pending access.
        let a = s.ns().get(inos[0]).unwrap().blob.unwrap();
        s.lru().note_access(a);
    }
    let s = Store::open(dir.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    // Oldest first: c, b, a.
    let ev = s.lru().evict_to(2000, |_| Some(())).unwrap();
    assert_eq!((ev.blobs, ev.bytes), (1, 1000));
    assert!(matches!(s.ns().lookup(root, b"c"), Err(Error::NotFound)));
    let ev = s.lru().evict_to(1000, |_| Some(())).unwrap();
    assert_eq!(ev.blobs, 1);
    let mut gone: Vec<Vec<u8>> = ev.names.iter().map(|n| n.1.clone()).collect();
    gone.sort();
    assert_eq!(gone, vec![b"b".to_vec(), b"b2".to_vec()]);
    assert_eq!(s.ns().lookup(root, b"a").unwrap().size, 1000);
    // A blob in use is never evicted.
    let a = s.ns().lookup(root, b"a").unwrap().blob.unwrap();
    let ev = s.lru().evict_to(0, |h| (*h != a).then_some(())).unwrap();
    assert_eq!(ev.blobs, 0);
    assert!(s.blobs().verify(|_, _| {}).unwrap().is_clean());
}

/// The usage counter the triggers keep equals a full count of local blobs after every kind
/// of change, and pins and limits behave as documented.
#[test]
fn usage_counter_pins_limits_and_clear_stay_exact() {
    let (_dir, s, root) = store_with_root();
    let sum = |s: &Store| -> u64 { s.stats().unwrap().stored_bytes };
    let d = s.ns().create(root, b"d", &node(Kind::Dir)).unwrap();
    let mut files = Vec::new();
    for i in 0..6u8 {
        let n = s
            .ns()
            .create(d.ino, &[b'f', b'0' + i], &node(Kind::File))
            .unwrap();
        // Two files share content: stored once.
        commit(&s, n.ino, &vec![i.min(4); 1000 + i.min(4) as usize]);
        files.push(n.ino);
        assert_eq!(s.stored_bytes().unwrap(), sum(&s));
    }
    // Overwrite, unlink + purge, evict: the counter follows each.
    commit(&s, files[0], &[9u8; 3000]);
    assert_eq!(s.stored_bytes().unwrap(), sum(&s));
    let (ino, nlink) = s.ns().unlink(d.ino, b"f1").unwrap();
    assert_eq!(nlink, 0);
    s.ns().purge(ino).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), sum(&s));

    // Pins: over half the quota is refused; pinned blobs are never evicted.
    let mut l = kcache_store::Limits {
        quota: Some(4000),
        ..Default::default()
    };
    s.set_limits(&l).unwrap();
    assert_eq!(s.limits().unwrap(), l);
    assert!(matches!(s.pin(d.ino), Err(Error::PinLimit { .. })));
    assert_eq!(s.pin(files[2]).unwrap(), 1002);
    l.quota = None;
    s.set_limits(&l).unwrap();
    let ev = s.lru().evict_to(0, |_| Some(())).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), 1002, "{ev:?}");
    assert_eq!(s.stored_bytes().unwrap(), sum(&s));
    assert_eq!(s.ns().lookup(d.ino, b"f2").unwrap().size, 1002);
    assert_eq!(s.pins(1).unwrap(), vec![(files[2], "/d/f2".to_string())]);

    // Clearing a tree leaves unlinked inodes for the caller to purge; gc purges them.
    let removed = s.clear_dir(root).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}"); // d/f2 and d
    let r = s.gc(|_| false).unwrap();
    assert_eq!(r.purged_inodes, 2);
    assert_eq!(s.stored_bytes().unwrap(), 0);
    assert_eq!(sum(&s), 0);
    assert!(s.pins(1).unwrap().is_empty(), "pins die with their inode");
    assert!(s.blobs().verify(|_, _| {}).unwrap().is_clean());
}

#[test]
fn clone_copies_metadata_only_and_volumes_stay_independent() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let a = s.volume("a", true, 0, 0).unwrap();
    let d = s.ns().create(a.root, b"d", &node(Kind::Dir)).unwrap();
    let f = s.ns().create(d.ino, b"f", &node(Kind::File)).unwrap();
    commit(&s, f.ino, b"shared content");
    s.ns().link(f.ino, a.root, b"hard").unwrap();
    s.ns()
        .setxattr(f.ino, b"user.k", b"v", false, false)
        .unwrap();
    let mut sym = node(Kind::Symlink);
    sym.target = Some(b"d/f".to_vec());
    s.ns().create(a.root, b"sym", &sym).unwrap();
    let blob_files = || walk_count(&dir.path().join("blobs"));
    let before = (s.stored_bytes().unwrap(), blob_files());

    let b = s.clone_volume("a", "b").unwrap();
    assert!(matches!(s.clone_volume("a", "b"), Err(Error::Exists)));
    assert_eq!(
        (s.stored_bytes().unwrap(), blob_files()),
        before,
        "no data copied"
    );
    let bd = s.ns().lookup(b.root, b"d").unwrap();
    let bf = s.ns().lookup(bd.ino, b"f").unwrap();
    assert_ne!(bf.ino, f.ino);
    assert_eq!(bf.nlink, 2);
    assert_eq!(s.ns().lookup(b.root, b"hard").unwrap().ino, bf.ino);
    assert_eq!(s.ns().getxattr(bf.ino, b"user.k").unwrap(), b"v");
    assert_eq!(s.ns().get(bd.ino).unwrap().parent, Some(b.root));
    assert_eq!(
        s.ns().lookup(b.root, b"sym").unwrap().target.as_deref(),
        Some(&b"d/f"[..])
    );
    assert!(
        s.blobs().verify(|_, _| {}).unwrap().is_clean(),
        "refcounts exact"
    );

    // Independent: new content and deletes in b never show in a.
    commit(&s, bf.ino, b"changed in b");
    s.ns().unlink(b.root, b"sym").unwrap();
    assert_eq!(
        s.ns().lookup(d.ino, b"f").unwrap().blob,
        s.ns().get(f.ino).unwrap().blob
    );
    assert_ne!(
        s.ns().get(f.ino).unwrap().blob,
        s.ns().get(bf.ino).unwrap().blob
    );
    assert!(s.ns().lookup(a.root, b"sym").is_ok());
    // A new inode in either volume gets a fresh number.
    let n = s.ns().create(a.root, b"new", &node(Kind::File)).unwrap();
    assert!(n.ino > bf.ino);

    // Removing b frees only what a does not use.
    s.remove_volume("b").unwrap();
    assert!(matches!(
        s.volume("b", false, 0, 0),
        Err(Error::NoVolume(_))
    ));
    assert_eq!(s.stored_bytes().unwrap(), before.0);
    assert!(s.blobs().verify(|_, _| {}).unwrap().is_clean());
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A file with holes hashes as its bytes (holes read as zeros), though its holes are never
/// read: at the start, between data, and at the end, with data not aligned to blocks.
#[test]
fn sparse_files_hash_as_their_bytes() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let layouts: &[(u64, &[(u64, usize)])] = &[
        (10 << 20, &[(5 << 20, 1)]),
        (3 << 20, &[(0, 100), (1 << 20, 70_000), ((3 << 20) - 1, 1)]),
        ((2 << 20) + 3, &[((1 << 20) + 4095, 2)]),
        (1 << 20, &[]),
    ];
    for (i, (size, data)) in layouts.iter().enumerate() {
        let p = dir.path().join(format!("f{i}"));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(*size).unwrap();
        let mut bytes = vec![0u8; *size as usize];
        for (j, &(off, n)) in data.iter().enumerate() {
            let d = vec![j as u8 + 1; n];
            f.write_all_at(&d, off).unwrap();
            bytes[off as usize..off as usize + n].copy_from_slice(&d);
        }
        let (h, len) = Store::hash_path(&p).unwrap();
        assert_eq!(len, *size);
        assert_eq!(h.0, *blake3::hash(&bytes).as_bytes(), "layout {i}");
    }
}

#[test]
fn inode_changes_move_with_every_inode_row_change_and_not_with_reads() {
    let (dir, s, root) = store_with_root();
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    let before = s.inode_changes();
    s.ns().get(f.ino).unwrap();
    s.ns().lookup(root, b"f").unwrap();
    s.ns().links(f.ino).unwrap();
    assert_eq!(s.inode_changes(), before, "reads change nothing");

    commit(&s, f.ino, b"content");
    let committed = s.inode_changes();
    assert!(committed > before, "a commit rewrites the inode's row");
    s.ns().link(f.ino, root, b"g").unwrap();
    let linked = s.inode_changes();
    assert!(linked > committed, "a new link");
    s.ns().unlink(root, b"g").unwrap();
    assert!(s.inode_changes() > linked, "an unlink");
    // A failed change rolls back, and may count: never less than before.
    let failed = s.inode_changes();
    assert!(s.ns().create(root, b"f", &node(Kind::File)).is_err());
    assert!(s.inode_changes() >= failed);

    // A read-only store cannot see the owner's changes: it never answers "unchanged".
    let ro = Store::open_with(
        dir.path(),
        &kcache_store::OpenOptionsStore { read_only: true },
    )
    .unwrap();
    assert_ne!(ro.inode_changes(), ro.inode_changes());
}

#[test]
fn lookup_and_getxattr_tell_a_missing_name_from_a_missing_or_wrong_parent() {
    let (_dir, s, root) = store_with_root();
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    assert_eq!(s.ns().lookup(root, b"f").unwrap().ino, f.ino);
    assert!(matches!(s.ns().lookup(root, b"nope"), Err(Error::NotFound)));
    assert!(matches!(s.ns().lookup(f.ino, b"x"), Err(Error::NotDir)));
    assert!(matches!(
        s.ns().lookup(f.ino + 1000, b"x"),
        Err(Error::NotFound)
    ));

    s.ns()
        .setxattr(f.ino, b"user.a", b"1", false, false)
        .unwrap();
    assert_eq!(s.ns().getxattr(f.ino, b"user.a").unwrap(), b"1");
    assert!(matches!(
        s.ns().getxattr(f.ino, b"user.b"),
        Err(Error::NoAttr)
    ));
    assert!(matches!(
        s.ns().getxattr(f.ino + 1000, b"user.a"),
        Err(Error::NotFound)
    ));
}
