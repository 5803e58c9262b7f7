//! Pulls of bad manifests: truncated, garbled or inconsistent ones are refused with a message
//! naming what is wrong, and the volume they would replace stays exactly as it was. A good
//! pull replaces it in one transaction, keeping content both trees share.

use std::io::{Read, Write};
use std::path::Path;

mod common;

use common::{commit, node};
use kcache_store::{FetchConfig, Kind, PullMode, Remote, Store, Upstream};

fn upstream(dir: &Path) -> Upstream {
    Upstream::parse(&format!("file://{}", dir.join("up").display())).unwrap()
}

fn remote(dir: &Path) -> Remote {
    Remote::new(vec![upstream(dir)], FetchConfig::default()).unwrap()
}

fn read(s: &Store, vol: &str, name: &str) -> Vec<u8> {
    let root = s.volume(vol, false, 0, 0).unwrap().root;
    let h = s.ns().lookup(root, name.as_bytes()).unwrap().blob.unwrap();
    let mut got = Vec::new();
    s.blobs()
        .open_blob(&h)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    got
}

/// Publishes `json` as the manifest of tag `tag` (unsigned), as a broken pusher would.
fn publish(dir: &Path, tag: &str, gz: &[u8]) {
    let hash = blake3::hash(gz).to_hex().to_string();
    std::fs::write(dir.join("up/manifests").join(&hash), gz).unwrap();
    std::fs::write(dir.join("up/tags").join(tag), format!("{hash}\n")).unwrap();
}

fn gzip(json: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json).unwrap();
    gz.finish().unwrap()
}

/// The JSON of the manifest tag `tag` names.
fn manifest_json(dir: &Path, tag: &str) -> serde_json::Value {
    let ptr = std::fs::read_to_string(dir.join("up/tags").join(tag)).unwrap();
    let gz = std::fs::read(dir.join("up/manifests").join(ptr.lines().next().unwrap())).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[test]
fn a_bad_manifest_leaves_the_volume_as_it_was_and_a_good_one_replaces_it_whole() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Store A publishes a tree under tag "good".
    let a = Store::open(&dir.join("a")).unwrap();
    let va = a.volume("default", true, 0, 0).unwrap();
    let sub = a.ns().create(va.root, b"sub", &node(Kind::Dir)).unwrap();
    let f = a.ns().create(sub.ino, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, b"pulled content");
    let shared = a
        .ns()
        .create(va.root, b"shared", &node(Kind::File))
        .unwrap();
    commit(&a, shared.ino, b"content both trees hold");
    a.push(&upstream(dir), "default", "good", None, &mut |_| {})
        .unwrap();

    // Store B has its own volume "v", holding some of the same content.
    let b = Store::open(&dir.join("b")).unwrap();
    let vb = b.volume("v", true, 0, 0).unwrap();
    let mine = b.ns().create(vb.root, b"mine", &node(Kind::File)).unwrap();
    commit(&b, mine.ino, b"local content");
    let same = b.ns().create(vb.root, b"same", &node(Kind::File)).unwrap();
    commit(&b, same.ino, b"content both trees hold");

    let good = manifest_json(dir, "good");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let json = serde_json::to_vec(&good).unwrap();
    cases.push((
        "truncated",
        gzip(&json[..json.len() / 2]),
        "EOF while parsing",
    ));
    cases.push(("garbled", b"\x1f\x8b not gzip at all".to_vec(), "manifest"));
    let mut wrong_links = good.clone();
    for n in wrong_links["inodes"].as_array_mut().unwrap() {
        if n["kind"] == 1 {
            n["nlink"] = 3.into();
        }
    }
    cases.push((
        "link counts",
        gzip(&serde_json::to_vec(&wrong_links).unwrap()),
        "link count 3 but 1 names",
    ));
    let mut dangling = good.clone();
    dangling["dirents"].as_array_mut().unwrap()[0][2] = 999_999.into();
    cases.push((
        "dangling name",
        gzip(&serde_json::to_vec(&dangling).unwrap()),
        "unknown inode 999999",
    ));
    let mut sizes = good.clone();
    sizes["blobs"].as_array_mut().unwrap().clear();
    cases.push((
        "missing sizes",
        gzip(&serde_json::to_vec(&sizes).unwrap()),
        "not in the blob list",
    ));
    for (what, gz, want) in &cases {
        publish(dir, "bad", gz);
        let e = b
            .pull(&remote(dir), "bad", "v", &[])
            .expect_err(what)
            .to_string();
        assert!(e.contains(want), "{what}: expected {want:?} in {e:?}");
        assert_eq!(read(&b, "v", "mine"), b"local content", "{what}");
        assert_eq!(read(&b, "v", "same"), b"content both trees hold", "{what}");
        assert!(b.blobs().verify(|_, _| {}).unwrap().is_clean(), "{what}");
    }

    // A good manifest replaces the volume whole; shared content stays local all along.
    let r = b.pull(&remote(dir), "good", "v", &[]).unwrap();
    assert_eq!(r.files, 2);
    let root = b.volume("v", false, 0, 0).unwrap().root;
    assert!(
        b.ns().lookup(root, b"mine").is_err(),
        "the old tree is gone"
    );
    assert_eq!(read(&b, "v", "shared"), b"content both trees hold");
    let sub = b.ns().lookup(root, b"sub").unwrap();
    let h = b.ns().lookup(sub.ino, b"f").unwrap().blob.unwrap();
    assert!(b.is_remote_only(&h), "new content is fetched on open");
    let v = b.blobs().verify(|_, _| {}).unwrap();
    assert!(v.is_clean() && v.stray_removed == 0, "{v:?}");
    assert_eq!(
        b.stats().unwrap().blobs,
        2,
        "local content no longer named was freed"
    );
}

/// Every name of volume `vol`: (path, inode, link count, content hash or symlink target).
fn tree(s: &Store, vol: &str) -> Vec<(String, u64, u32, String)> {
    fn walk(s: &Store, dir: u64, path: &str, out: &mut Vec<(String, u64, u32, String)>) {
        for (_, name, n) in s.ns().readdir(dir, 0, 100_000).unwrap() {
            let p = format!("{path}{}", String::from_utf8_lossy(&name));
            let what = match (&n.blob, &n.target) {
                (Some(h), _) => h.to_hex().to_string(),
                (_, Some(t)) => String::from_utf8_lossy(t).into_owned(),
                _ => String::new(),
            };
            out.push((p.clone(), n.ino, n.nlink, what));
            if n.kind == Kind::Dir {
                walk(s, n.ino, &format!("{p}/"), out);
            }
        }
    }
    let root = s.volume(vol, false, 0, 0).unwrap().root;
    let mut out = Vec::new();
    walk(s, root, "", &mut out);
    out.sort();
    out
}

fn merge(theirs: bool) -> PullMode {
    PullMode::Merge { theirs }
}

#[test]
fn a_bad_manifest_leaves_the_volume_as_it_was_in_every_mode() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let a = Store::open(&dir.join("a")).unwrap();
    let va = a.volume("default", true, 0, 0).unwrap();
    let f = a.ns().create(va.root, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, b"pulled content");
    let n = a.ns().create(va.root, b"mine", &node(Kind::File)).unwrap();
    commit(&a, n.ino, b"their mine");
    a.push(&upstream(dir), "default", "good", None, &mut |_| {})
        .unwrap();
    let b = Store::open(&dir.join("b")).unwrap();
    let vb = b.volume("v", true, 0, 0).unwrap();
    let mine = b.ns().create(vb.root, b"mine", &node(Kind::File)).unwrap();
    commit(&b, mine.ino, b"local content");
    let before = tree(&b, "v");

    let good = manifest_json(dir, "good");
    let json = serde_json::to_vec(&good).unwrap();
    let mut wrong_kind = good.clone();
    wrong_kind["inodes"].as_array_mut().unwrap()[1]["kind"] = 42.into();
    let mut no_root = good.clone();
    no_root["root"] = 424_242.into();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            gzip(&json[..json.len() - 7]),
            "EOF while parsing",
        ),
        ("garbled", b"\x1f\x8b garbage".to_vec(), "manifest"),
        (
            "bad kind",
            gzip(&serde_json::to_vec(&wrong_kind).unwrap()),
            "kind 42",
        ),
        (
            "no root",
            gzip(&serde_json::to_vec(&no_root).unwrap()),
            "root 424242 is not a directory",
        ),
    ];
    for mode in [merge(false), merge(true), PullMode::Replace] {
        for (what, gz, want) in &cases {
            publish(dir, "bad", gz);
            let e = b
                .pull_with(&remote(dir), "bad", "v", &[], mode)
                .expect_err(what)
                .to_string();
            assert!(
                e.contains(want),
                "{mode:?} {what}: expected {want:?} in {e:?}"
            );
            assert_eq!(tree(&b, "v"), before, "{mode:?} {what}");
            assert!(
                b.blobs().verify(|_, _| {}).unwrap().is_clean(),
                "{mode:?} {what}"
            );
        }
    }
}

/// The snapshot: sub/f, shared, conflict, h1 and h2 (one inode), l -> sub/f, d (a file),
/// x (a file). The volume: mine, shared (same content), conflict (other content), h1 (its
/// own), d/ (a directory), x/y.
fn conflicting_stores(dir: &Path) -> (Store, Store) {
    let a = Store::open(&dir.join("a")).unwrap();
    let va = a.volume("default", true, 0, 0).unwrap();
    let sub = a.ns().create(va.root, b"sub", &node(Kind::Dir)).unwrap();
    let f = a.ns().create(sub.ino, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, b"pulled content");
    let file = |name: &[u8], content: &[u8]| {
        let n = a.ns().create(va.root, name, &node(Kind::File)).unwrap();
        commit(&a, n.ino, content);
        n.ino
    };
    file(b"shared", b"content both trees hold");
    let c = file(b"conflict", b"theirs");
    a.ns()
        .setxattr(c, b"user.side", b"theirs", false, false)
        .unwrap();
    let h = file(b"h1", b"linked");
    a.ns().link(h, va.root, b"h2").unwrap();
    file(b"d", b"a file where the volume has a directory");
    file(b"x", b"a file where the volume has a tree");
    let mut l = node(Kind::Symlink);
    l.target = Some(b"sub/f".to_vec());
    a.ns().create(va.root, b"l", &l).unwrap();
    a.push(&upstream(dir), "default", "snap", None, &mut |_| {})
        .unwrap();

    let b = Store::open(&dir.join("b")).unwrap();
    let vb = b.volume("v", true, 0, 0).unwrap();
    let file = |name: &[u8], content: &[u8]| {
        let n = b.ns().create(vb.root, name, &node(Kind::File)).unwrap();
        commit(&b, n.ino, content);
        n.ino
    };
    file(b"mine", b"local content");
    file(b"shared", b"content both trees hold");
    file(b"conflict", b"ours");
    file(b"h1", b"our h1");
    b.ns().create(vb.root, b"d", &node(Kind::Dir)).unwrap();
    let x = b.ns().create(vb.root, b"x", &node(Kind::Dir)).unwrap();
    let y = b.ns().create(x.ino, b"y", &node(Kind::File)).unwrap();
    commit(&b, y.ino, b"deep local");
    (a, b)
}

#[test]
fn a_merge_adds_what_is_missing_and_keeps_local_names_and_conflicts() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (_a, b) = conflicting_stores(dir);
    let p = b
        .pull_with(&remote(dir), "snap", "v", &[], PullMode::default())
        .unwrap();
    let r = &p.report;
    assert_eq!(r.mode, "merge");
    assert_eq!(
        (r.added, r.updated, r.unchanged, r.kept, r.skipped),
        (4, 0, 1, 4, 0),
        "{r:?}"
    );
    assert_eq!(r.local_only, 1, "mine");
    let mut conflicts = r.conflicts.clone();
    conflicts.sort();
    assert_eq!(conflicts, ["conflict", "d", "h1", "x"]);
    assert_eq!(r.files, 2, "sub/f and h2");
    assert!(p.changed.iter().all(|c| c.replaced.is_none()));
    assert_eq!(p.changed.len(), 3, "sub, h2 and l in the root");

    assert_eq!(read(&b, "v", "mine"), b"local content");
    assert_eq!(read(&b, "v", "shared"), b"content both trees hold");
    assert_eq!(read(&b, "v", "conflict"), b"ours");
    assert_eq!(read(&b, "v", "h1"), b"our h1");
    let root = b.volume("v", false, 0, 0).unwrap().root;
    assert_eq!(b.ns().lookup(root, b"d").unwrap().kind, Kind::Dir);
    let x = b.ns().lookup(root, b"x").unwrap();
    assert!(b.ns().lookup(x.ino, b"y").is_ok());
    // h2 is new; its snapshot partner h1 was kept local, so h2 has one name.
    let h2 = b.ns().lookup(root, b"h2").unwrap();
    assert_eq!(h2.nlink, 1);
    assert!(b.is_remote_only(&h2.blob.unwrap()));
    let sub = b.ns().lookup(root, b"sub").unwrap();
    assert_eq!(sub.nlink, 2);
    assert!(b.ns().lookup(sub.ino, b"f").unwrap().blob.is_some());
    assert_eq!(
        b.ns().lookup(root, b"l").unwrap().target.as_deref(),
        Some(&b"sub/f"[..])
    );
    assert_eq!(b.ns().get(root).unwrap().nlink, 5, "root, ., d, x, sub");
    let v = b.blobs().verify(|_, _| {}).unwrap();
    assert!(v.is_clean(), "{v:?}");

    // Merging the same snapshot again changes nothing (shared, h2, l, sub/f are the same;
    // directories on both sides are merged, not counted).
    let before = tree(&b, "v");
    let again = b
        .pull_with(&remote(dir), "snap", "v", &[], PullMode::default())
        .unwrap();
    assert_eq!(
        (
            again.report.added,
            again.report.updated,
            again.report.unchanged
        ),
        (0, 0, 4),
        "{:?}",
        again.report
    );
    assert_eq!(tree(&b, "v"), before);
}

#[test]
fn a_merge_with_theirs_replaces_conflicts_as_a_rename_over_them_would() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (_a, b) = conflicting_stores(dir);
    let root = b.volume("v", false, 0, 0).unwrap().root;
    let old = b.ns().lookup(root, b"conflict").unwrap();
    let p = b
        .pull_with(&remote(dir), "snap", "v", &[], merge(true))
        .unwrap();
    let r = &p.report;
    assert_eq!(
        (r.added, r.updated, r.unchanged, r.kept, r.skipped),
        (4, 2, 1, 0, 2),
        "{r:?}"
    );
    assert_eq!(r.local_only, 1, "mine");
    let mut skipped = r.conflicts.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        ["d", "x"],
        "directory against file is never replaced"
    );
    assert_eq!(r.files, 3, "sub/f, conflict, h1+h2");

    // The replaced inode lost its only name but keeps its content until purged, like a
    // file unlinked while open.
    let gone = p
        .changed
        .iter()
        .find(|c| c.name == b"conflict")
        .unwrap()
        .replaced
        .unwrap();
    assert_eq!(gone, (old.ino, 0));
    let orphan = b.ns().get(old.ino).unwrap();
    assert_eq!(orphan.nlink, 0);
    let mut got = Vec::new();
    b.blobs()
        .open_blob(&orphan.blob.unwrap())
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, b"ours");

    let c = b.ns().lookup(root, b"conflict").unwrap();
    assert_ne!(c.ino, old.ino);
    assert_eq!(b.ns().getxattr(c.ino, b"user.side").unwrap(), b"theirs");
    let h1 = b.ns().lookup(root, b"h1").unwrap();
    let h2 = b.ns().lookup(root, b"h2").unwrap();
    assert_eq!(
        (h1.ino, h1.nlink),
        (h2.ino, 2),
        "hard links stay hard links"
    );
    assert_eq!(read(&b, "v", "mine"), b"local content");
    assert_eq!(b.ns().lookup(root, b"d").unwrap().kind, Kind::Dir);
    assert!(b.blobs().verify(|_, _| {}).unwrap().is_clean());

    // Once nothing holds them the replaced inodes go, with content only they used.
    let blobs = b.stats().unwrap().blobs;
    for c in &p.changed {
        if let Some((ino, 0)) = c.replaced {
            b.ns().purge(ino).unwrap();
        }
    }
    assert_eq!(b.stats().unwrap().blobs, blobs - 2, "ours and our h1 freed");
    let v = b.blobs().verify(|_, _| {}).unwrap();
    assert!(v.is_clean() && v.stray_removed == 0, "{v:?}");
}

#[test]
fn a_merge_into_an_empty_volume_takes_the_snapshot_root_as_it_is() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let a = Store::open(&dir.join("a")).unwrap();
    let va = a.volume("default", true, 0, 0).unwrap();
    let f = a.ns().create(va.root, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, b"content");
    a.ns()
        .setattr(
            va.root,
            &kcache_store::SetAttr {
                mode: Some(0o700),
                uid: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
    a.ns()
        .setxattr(va.root, b"user.root", b"yes", false, false)
        .unwrap();
    a.push(&upstream(dir), "default", "t", None, &mut |_| {})
        .unwrap();
    let b = Store::open(&dir.join("b")).unwrap();
    let vb = b.volume("v", true, 0, 0).unwrap();
    let r = b
        .pull_with(&remote(dir), "t", "v", &[], PullMode::default())
        .unwrap()
        .report;
    assert_eq!((r.added, r.files), (1, 1), "{r:?}");
    let root = b.ns().get(vb.root).unwrap();
    assert_eq!((root.mode, root.uid), (0o700, 7));
    assert_eq!(b.ns().getxattr(vb.root, b"user.root").unwrap(), b"yes");
    let h = b.ns().lookup(vb.root, b"f").unwrap().blob.unwrap();
    assert!(b.is_remote_only(&h), "fetched on first open");
    assert!(b.blobs().verify(|_, _| {}).unwrap().is_clean());
}

#[test]
fn a_merge_whose_transaction_fails_leaves_the_volume_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (_a, b) = conflicting_stores(dir);
    let before = tree(&b, "v");
    let blobs = b.stats().unwrap().blobs;
    for theirs in [false, true] {
        b.faults().always(
            kcache_store::Step::DbCommit,
            kcache_store::Fault::Errno(libc::EIO),
        );
        let e = b.pull_with(&remote(dir), "snap", "v", &[], merge(theirs));
        b.faults().clear();
        assert!(e.is_err(), "theirs {theirs}");
        assert_eq!(tree(&b, "v"), before, "theirs {theirs}");
        assert_eq!(b.stats().unwrap().blobs, blobs, "no blob row taken");
        assert!(b.blobs().verify(|_, _| {}).unwrap().is_clean());
    }
}
