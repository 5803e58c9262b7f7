//! Additive pushes: machines pushing different trees to one tag at the same moment all get
//! their files in; `--replace` publishes one volume alone.

mod common;

use common::{commit, four_pushers_one_tag, node};
use kcache_store::{Kind, Remote, Store, Upstream};

#[test]
fn four_concurrent_pushers_to_one_file_tag_all_land_with_random_timing() {
    let d = tempfile::tempdir().unwrap();
    let up = Upstream::parse(&format!("file://{}", d.path().join("up").display())).unwrap();
    for round in 0..6 {
        four_pushers_one_tag(&up, &format!("fleet-{round}"), [0, 5, 30][round % 3]);
    }
}

#[test]
fn a_push_adds_to_the_tag_and_replace_publishes_the_volume_alone() {
    let d = tempfile::tempdir().unwrap();
    let up = Upstream::parse(&format!("file://{}", d.path().join("up").display())).unwrap();
    let mk = |name: &str, files: &[(&str, &str)]| {
        let s = Store::open(&d.path().join(name)).unwrap();
        let v = s.volume("default", true, 0, 0).unwrap();
        for (f, c) in files {
            let n = s
                .ns()
                .create(v.root, f.as_bytes(), &node(Kind::File))
                .unwrap();
            commit(&s, n.ino, c.as_bytes());
        }
        s
    };
    let a = mk("a", &[("a", "from a"), ("both", "a's version")]);
    let b = mk("b", &[("b", "from b"), ("both", "b's version")]);
    let first = a.push(&up, "default", "t", None, &mut |_| {}).unwrap();
    assert_eq!(first.merged_with, None);
    let second = b.push(&up, "default", "t", None, &mut |_| {}).unwrap();
    assert_eq!(second.merged_with.as_deref(), Some(first.manifest.as_str()));
    let names = |tag: &str| -> Vec<(String, String)> {
        let p = Store::open(&d.path().join(format!("pull-{tag}-{}", rand()))).unwrap();
        let r = Remote::new(vec![up.clone()], Default::default()).unwrap();
        p.pull(&r, tag, "default", &[]).unwrap();
        let root = p.volume("default", false, 0, 0).unwrap().root;
        let mut out: Vec<(String, String)> = ["a", "b", "both"]
            .iter()
            .filter_map(|n| {
                let i = p.ns().lookup(root, n.as_bytes()).ok()?;
                Some((n.to_string(), i.blob.unwrap().to_hex()))
            })
            .collect();
        out.sort();
        out
    };
    let h = |c: &str| blake3::hash(c.as_bytes()).to_hex().to_string();
    // The later push wins the name both have; each keeps its own.
    assert_eq!(
        names("t"),
        [
            ("a".into(), h("from a")),
            ("b".into(), h("from b")),
            ("both".into(), h("b's version"))
        ]
    );
    let replaced = a
        .push_with(&up, "default", "t", None, true, &mut |_| {})
        .unwrap();
    assert_eq!(replaced.merged_with, None);
    assert_eq!(
        names("t"),
        [("a".into(), h("from a")), ("both".into(), h("a's version"))]
    );
}

fn rand() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}
