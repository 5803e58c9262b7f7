//! The store's files (`Store::blobs`): staged content committed into one read-only blob file
//! per distinct content, duplicates dropped, damaged blobs refused and quarantined.

mod common;

use common::{armed, commit, node, staged};
use kcache_store::{Kind, Staged, Store};

#[test]
fn one_file_per_content_read_only_and_damage_is_refused_then_quarantined() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let a = s.ns().create(root, b"a", &node(Kind::File)).unwrap();
    let b = s.ns().create(root, b"b", &node(Kind::File)).unwrap();
    commit(&s, a.ino, b"same bytes");
    // The commit deletes the staging file once its transaction is in: at once, with no
    // group open.
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
    let (file, path) = armed(&s, f.ino, b"written long ago");
    let (h, _) = s
        .blobs()
        .commit_staged(&staged(f.ino, &path, &file))
        .unwrap();
    assert!(path.exists(), "the staging file went before its commit did");
    assert!(s.blobs().blob_path(&h).exists());
    s.commit_group().unwrap();
    assert!(!path.exists(), "the staging file outlived its commit");
    assert_eq!(s.ns().get(f.ino).unwrap().blob, Some(h));
}

/// SQLite rolls a whole transaction back when its COMMIT fails with a full disk or an I/O
/// error. For the daemon's group that means changes already acknowledged are gone: the store
/// must stop taking changes (fail closed, as ext4 remounts read-only on a journal error)
/// rather than build on the hole, refuse fsync, and keep the staging files the lost group had
/// recorded so that the next open brings their content back.
#[test]
fn a_group_the_database_rolls_back_halts_changes_and_its_content_comes_back_at_reopen() {
    use kcache_store::Fault;
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(Store::open(d.path()).unwrap());
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    // Old content that another file keeps: a blob dying would commit the group at once
    // (before its file is deleted).
    let keeper = s.ns().create(root, b"keeper", &node(Kind::File)).unwrap();
    commit(&s, f.ino, b"old");
    commit(&s, keeper.ino, b"old");
    s.start_group_commit(std::time::Duration::from_secs(3600));

    // In the group: new content for f, and a new name.
    let (file, path) = armed(&s, f.ino, b"new content");
    let (h, _) = s
        .blobs()
        .commit_staged(&staged(f.ino, &path, &file))
        .unwrap();
    s.ns().create(root, b"g", &node(Kind::File)).unwrap();
    assert_eq!(s.ns().get(f.ino).unwrap().blob, Some(h));
    assert!(s.halted().is_none());
    assert!(
        path.exists(),
        "the staging file went before the group committed"
    );

    s.faults().at(0, Fault::Errno(libc::ENOSPC));
    let e = s.commit_group().unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    s.faults().clear();
    assert!(s.halted().is_some(), "a lost group went unnoticed");
    assert!(path.exists(), "the lost group's staging file was deleted");
    assert!(
        s.ns().lookup(root, b"g").is_err(),
        "the group was not rolled back"
    );

    // Nothing more is taken, and nothing claims to be durable; reads go on.
    let e = s.ns().create(root, b"h", &node(Kind::File)).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("remount"), "{e}");
    assert_eq!(s.sync().unwrap_err().errno(), libc::EIO);
    assert!(s.ns().lookup(root, b"f").is_ok());
    s.commit_group().unwrap();
    assert!(
        path.exists(),
        "a later group commit deleted the lost group's staging file"
    );
    drop(file);
    drop(s);

    // The next open recovers what the staging file holds, as after a crash.
    let s = Store::open(d.path()).unwrap();
    let f2 = s.ns().lookup(root, b"f").unwrap();
    assert_eq!(f2.ino, f.ino);
    assert_eq!(f2.blob, Some(h), "the content the lost group had recorded");
    assert!(!path.exists());
    assert!(s.ns().lookup(root, b"h").is_err());
    assert!(s.halted().is_none());
    s.ns().create(root, b"h", &node(Kind::File)).unwrap();
}

/// The group's COMMIT is a step of its own for the fault plan (it fails as a whole, unlike a
/// transaction's savepoint release).
#[test]
fn a_group_commit_is_a_recorded_step() {
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(Store::open(d.path()).unwrap());
    let root = s.volume("default", true, 0, 0).unwrap().root;
    s.start_group_commit(std::time::Duration::from_secs(3600));
    s.faults().record();
    s.ns().create(root, b"x", &node(Kind::File)).unwrap();
    s.commit_group().unwrap();
    s.commit_group().unwrap();
    let steps = s.faults().recorded();
    assert_eq!(
        steps
            .iter()
            .filter(|x| **x == kcache_store::Step::GroupCommit)
            .count(),
        1,
        "{steps:?}"
    );
}

/// On a store whose filesystem refuses hard links (EPERM, EOPNOTSUPP; here injected), a
/// commit renames the staging file into `blobs/`. If its transaction then fails, the blob file
/// *is* the staging file: it must go back under its armed name, not be deleted, or the only
/// copy of content the kernel acknowledged is gone and every retry fails.
#[test]
fn a_failed_commit_without_hard_links_gives_the_staging_file_back() {
    use kcache_store::{Fault, Step};
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    let (file, path) = armed(&s, f.ino, b"only copy");
    let st = staged(f.ino, &path, &file);
    s.faults().always(Step::Link, Fault::Errno(libc::EPERM));
    s.faults().always(Step::DbCommit, Fault::Errno(libc::EIO));
    let e = s.blobs().commit_staged(&st).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"only copy",
        "the staging file is gone"
    );
    s.faults().clear();
    s.faults().always(Step::Link, Fault::Errno(libc::EPERM));
    let (h, _) = s.blobs().commit_staged(&st).unwrap();
    s.faults().clear();
    assert!(!path.exists(), "renamed into blobs/");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut s.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
    assert_eq!(got, b"only copy");
    assert_eq!(s.ns().get(f.ino).unwrap().blob, Some(h));
}

/// Content a leaving daemon could not commit (its store halted, a commit failing at the
/// unmount) stays armed in `staging/`, which the next open commits only in the same boot:
/// its bytes were never synced. `keep_staging_across_reboot` syncs such files and marks them
/// so, and then a reboot keeps them too; an armed file of an earlier boot without the mark
/// still goes.
#[test]
fn staging_files_a_leaving_daemon_made_durable_survive_a_reboot() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let f = s.ns().create(root, b"f", &node(Kind::File)).unwrap();
    let g = s.ns().create(root, b"g", &node(Kind::File)).unwrap();
    let (_file, _) = armed(&s, f.ino, b"could not be committed");
    assert_eq!(s.keep_staging_across_reboot().unwrap(), 1);
    // g's staged bytes were never synced: as if from an earlier boot.
    let (_file, path) = armed(&s, g.ino, b"never synced");
    let name = path.file_name().unwrap().to_str().unwrap();
    let (base, _) = name.rsplit_once(".b").unwrap();
    std::fs::rename(&path, path.with_file_name(format!("{base}.bdeadbeef"))).unwrap();
    drop(s);

    // f's file carries no boot id of this boot any more: only the mark keeps it.
    let s = Store::open(d.path()).unwrap();
    let h = s.ns().get(f.ino).unwrap().blob.expect("the kept content");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut s.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
    assert_eq!(got, b"could not be committed");
    assert_eq!(s.ns().get(g.ino).unwrap().blob, None);
    assert_eq!(
        std::fs::read_dir(d.path().join("staging")).unwrap().count(),
        0
    );
}
