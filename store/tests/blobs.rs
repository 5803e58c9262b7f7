//! The store's files (`Store::blobs`): staged content committed into one read-only blob file
//! per distinct content, duplicates dropped, damaged blobs refused and quarantined.

mod common;

use common::{commit, node};
use kcache_store::{Kind, Staged, Store};

#[test]
fn one_file_per_content_read_only_and_damage_is_refused_then_quarantined() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let a = s.ns().create(root, b"a", &node(Kind::File)).unwrap();
    let b = s.ns().create(root, b"b", &node(Kind::File)).unwrap();
    commit(&s, a.ino, b"same bytes");
    // A commit keeps the staging file (the caller retires it once the commit is in).
    let (file, path) = s.blobs().new_staging().unwrap();
    std::io::Write::write_all(&mut &file, b"same bytes").unwrap();
    let (h, size) = s
        .blobs()
        .commit_staged(&Staged {
            ino: b.ino,
            path: &path,
            file: &file,
            known: None,
            durable: true,
            mtime: 1,
        })
        .unwrap();
    assert_eq!(size, 10);
    assert!(path.exists());
    s.blobs().retire_staging(path.clone());
    assert!(!path.exists(), "no group is open: retired at once");
    let blob = s.blobs().blob_path(&h);
    let md = std::fs::metadata(&blob).unwrap();
    assert!(md.permissions().readonly(), "a blob file is writable");
    assert_eq!(s.stats().unwrap().blobs, 1);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut s.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
    assert_eq!(got, b"same bytes");
    // A blob file cut short is refused, never served; verify quarantines it.
    let mut perm = md.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&blob, perm).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(4)
        .unwrap();
    assert!(s.blobs().open_blob(&h).is_err(), "a short blob was opened");
    let r = s.blobs().verify(|_, _| {}).unwrap();
    assert_eq!(r.quarantined, vec![h.to_hex()]);
    assert!(!blob.exists());
}

/// A committed staging file stays until its commit is in the database: with a group open it
/// is deleted only when the group commits, so a crash in between still finds it armed and
/// keeps its content (the crash test once saw a held-open file lose writes made long before,
/// because its staging file was already gone when the group was lost).
#[test]
fn a_staging_file_goes_only_once_the_group_that_recorded_it_commits() {
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(Store::open(d.path()).unwrap());
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    // A group that only this test commits.
    s.start_group_commit(std::time::Duration::from_secs(3600));
    let (file, path) = s.blobs().new_armed_staging(f.ino).unwrap();
    std::io::Write::write_all(&mut &file, b"written long ago").unwrap();
    let (h, _) = s
        .blobs()
        .commit_staged(&Staged {
            ino: f.ino,
            path: &path,
            file: &file,
            known: None,
            durable: false,
            mtime: 1,
        })
        .unwrap();
    s.blobs().retire_staging(path.clone());
    assert!(path.exists(), "the staging file went before its commit did");
    assert!(s.blobs().blob_path(&h).exists());
    s.commit_group().unwrap();
    assert!(!path.exists(), "the staging file outlived its commit");
    assert_eq!(s.ns().get(f.ino).unwrap().blob, Some(h));
}
