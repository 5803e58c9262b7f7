//! Helpers shared by the store's integration tests.

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

/// Gives inode `ino` the content `content`, as a closed writer's commit does.
pub fn commit(store: &Store, ino: u64, content: &[u8]) {
    let (file, path) = store.new_staging().unwrap();
    std::io::Write::write_all(&mut &file, content).unwrap();
    let st = Staged {
        ino,
        path: &path,
        file: &file,
        known: None,
        durable: false,
        mtime: 1,
    };
    let (_, size, renamed) = store.commit_staged(&st).unwrap();
    assert_eq!(size, content.len() as u64);
    if !renamed {
        std::fs::remove_file(&path).unwrap();
    }
}
