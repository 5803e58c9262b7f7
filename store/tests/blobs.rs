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
    // The second commit of the same bytes keeps the staging file (the caller's to delete).
    let (file, path) = s.blobs().new_staging().unwrap();
    std::io::Write::write_all(&mut &file, b"same bytes").unwrap();
    let (h, size, renamed) = s
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
    assert_eq!((size, renamed), (10, false));
    assert!(path.exists());
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
