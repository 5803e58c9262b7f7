//! Pulls of bad manifests: truncated, garbled or inconsistent ones are refused with a message
//! naming what is wrong, and the volume they would replace stays exactly as it was. A good
//! pull replaces it in one transaction, keeping content both trees share.

use std::io::{Read, Write};
use std::path::Path;

mod common;

use common::{commit, node};
use kcache_store::{FetchConfig, Kind, Remote, Store, Upstream};

fn upstream(dir: &Path) -> Upstream {
    Upstream::parse(&format!("file://{}", dir.join("up").display())).unwrap()
}

fn remote(dir: &Path) -> Remote {
    Remote::new(vec![upstream(dir)], FetchConfig::default()).unwrap()
}

fn read(s: &Store, vol: &str, name: &str) -> Vec<u8> {
    let root = s.volume(vol, false, 0, 0).unwrap().root;
    let h = s.lookup(root, name.as_bytes()).unwrap().blob.unwrap();
    let mut got = Vec::new();
    s.open_blob(&h).unwrap().read_to_end(&mut got).unwrap();
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
    let sub = a.create(va.root, b"sub", &node(Kind::Dir)).unwrap();
    let f = a.create(sub.ino, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, b"pulled content");
    let shared = a.create(va.root, b"shared", &node(Kind::File)).unwrap();
    commit(&a, shared.ino, b"content both trees hold");
    a.push(&upstream(dir), "default", "good", None, &mut |_| {})
        .unwrap();

    // Store B has its own volume "v", holding some of the same content.
    let b = Store::open(&dir.join("b")).unwrap();
    let vb = b.volume("v", true, 0, 0).unwrap();
    let mine = b.create(vb.root, b"mine", &node(Kind::File)).unwrap();
    commit(&b, mine.ino, b"local content");
    let same = b.create(vb.root, b"same", &node(Kind::File)).unwrap();
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
        assert!(b.verify(|_, _| {}).unwrap().is_clean(), "{what}");
    }

    // A good manifest replaces the volume whole; shared content stays local all along.
    let r = b.pull(&remote(dir), "good", "v", &[]).unwrap();
    assert_eq!(r.files, 2);
    let root = b.volume("v", false, 0, 0).unwrap().root;
    assert!(b.lookup(root, b"mine").is_err(), "the old tree is gone");
    assert_eq!(read(&b, "v", "shared"), b"content both trees hold");
    let sub = b.lookup(root, b"sub").unwrap();
    let h = b.lookup(sub.ino, b"f").unwrap().blob.unwrap();
    assert!(b.is_remote_only(&h), "new content is fetched on open");
    let v = b.verify(|_, _| {}).unwrap();
    assert!(v.is_clean() && v.stray_removed == 0, "{v:?}");
    assert_eq!(
        b.stats().unwrap().blobs,
        2,
        "local content no longer named was freed"
    );
}
