//! The store's LRU order and eviction (`Store::lru`), without a filesystem: least recently
//! used first, accesses counting, claimed (open) and pinned blobs skipped, both limits.

mod common;

use common::{commit, node};
use kcache_store::{EvictPolicy, Kind, Store};

#[test]
fn eviction_goes_least_recently_used_first_and_skips_claimed_and_pinned_blobs() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let root = s.volume("default", true, 0, 0).unwrap().root;
    let mut blob = std::collections::HashMap::new();
    for name in ["a", "b", "c", "p"] {
        let f = s
            .ns()
            .create(root, name.as_bytes(), &node(Kind::File))
            .unwrap();
        commit(&s, f.ino, name.repeat(1000).as_bytes());
        let h = s.ns().get(f.ino).unwrap().blob.unwrap();
        blob.insert(name, (f.ino, h));
    }
    // Commits set the order a < b < c < p; reading a makes it the most recent.
    s.lru().note_access(blob["a"].1);
    s.pin(blob["p"].0).unwrap();
    let b = blob["b"].1;
    // b is claimed by someone (open), p pinned: c goes first, then a.
    let ev = s.lru().evict_to(0, |h| (*h != b).then_some(())).unwrap();
    assert_eq!((ev.blobs, ev.bytes), (2, 2000));
    let mut gone: Vec<Vec<u8>> = ev.names.iter().map(|n| n.1.clone()).collect();
    gone.sort();
    assert_eq!(gone, [b"a".to_vec(), b"c".to_vec()]);
    assert!(s.ns().lookup(root, b"c").is_err() && s.ns().lookup(root, b"b").is_ok());
    // An age limit in the past takes nothing; one now takes b (no longer claimed), never p.
    let nothing = s
        .lru()
        .evict(
            EvictPolicy {
                target: None,
                used_before: Some(0),
            },
            |_| Some(()),
        )
        .unwrap();
    assert_eq!(nothing.blobs, 0);
    let ev = s
        .lru()
        .evict(
            EvictPolicy {
                target: None,
                used_before: Some(kcache_store::now_ns() + 1),
            },
            |_| Some(()),
        )
        .unwrap();
    assert_eq!(ev.blobs, 1);
    assert!(
        s.ns().lookup(root, b"p").is_ok(),
        "a pinned file was evicted"
    );
    assert_eq!(s.stored_bytes().unwrap(), 1000);
    assert!(s.blobs().verify(|_, _| {}).unwrap().is_clean());
}
