//! A volume snapshot's manifest (the JSON inside `manifests/<hash>` on an upstream) and its
//! validation: a pull checks the whole manifest (tree shape, inode ids, link counts against
//! names, kinds, sizes, hashes) before it changes anything, so a truncated, garbled or
//! inconsistent manifest is refused with a message naming what is wrong and the volume stays
//! as it was.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::{Hash, Kind};

pub(crate) const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub version: u32,
    pub volume: String,
    pub created: i64,
    pub root: i64,
    /// (hash hex, size) of every blob the volume uses.
    pub blobs: Vec<(String, u64)>,
    pub inodes: Vec<MInode>,
    pub dirents: Vec<(i64, Vec<u8>, i64)>,
    pub xattrs: Vec<(i64, Vec<u8>, Vec<u8>)>,
}

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct MInode {
    pub id: i64,
    pub kind: i64,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub size: i64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub nlink: i64,
    pub rdev: i64,
    pub blob: Option<String>,
    pub target: Option<Vec<u8>>,
}

/// Checks everything a pull relies on; the error says what is wrong.
pub(crate) fn validate(m: &Manifest) -> Result<(), String> {
    if m.version != MANIFEST_VERSION {
        return Err(format!(
            "version {}, this kcache reads {MANIFEST_VERSION}",
            m.version
        ));
    }
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for (hex, size) in &m.blobs {
        if Hash::from_hex(hex).is_none() {
            return Err(format!(
                "blob list names {hex:?}, which is not a BLAKE3 hash"
            ));
        }
        if sizes.insert(hex, *size).is_some_and(|s| s != *size) {
            return Err(format!("blob {hex} is listed with two sizes"));
        }
    }
    let mut kinds: HashMap<i64, Kind> = HashMap::new();
    for n in &m.inodes {
        let what = |s: &str| format!("inode {}: {s}", n.id);
        let kind = Kind::from_code(n.kind).ok_or_else(|| what(&format!("kind {}", n.kind)))?;
        if kinds.insert(n.id, kind).is_some() {
            return Err(what("listed twice"));
        }
        if !(0..=0o7777).contains(&n.mode) {
            return Err(what(&format!("mode {:#o}", n.mode)));
        }
        for (v, name) in [(n.uid, "uid"), (n.gid, "gid"), (n.rdev, "rdev")] {
            if u32::try_from(v).is_err() {
                return Err(what(&format!("{name} {v}")));
            }
        }
        if n.size < 0 {
            return Err(what(&format!("size {}", n.size)));
        }
        if n.nlink < 1 {
            return Err(what(&format!("link count {}", n.nlink)));
        }
        match (&n.blob, kind) {
            (Some(hex), Kind::File) => {
                let size = sizes
                    .get(hex.as_str())
                    .ok_or_else(|| what(&format!("blob {hex} is not in the blob list")))?;
                if *size != n.size as u64 {
                    return Err(what(&format!(
                        "size {} but its blob {hex} has {size} bytes",
                        n.size
                    )));
                }
            }
            (Some(_), _) => return Err(what("content on something that is not a file")),
            (None, Kind::File) if n.size != 0 => {
                return Err(what(&format!("size {} without content", n.size)))
            }
            _ => {}
        }
        if (kind == Kind::Symlink) != n.target.is_some() {
            return Err(what("a symlink needs a target, and only a symlink has one"));
        }
    }
    if kinds.get(&m.root) != Some(&Kind::Dir) {
        return Err(format!(
            "root {} is not a directory of the manifest",
            m.root
        ));
    }
    // Names: parents are directories, children exist, names are single path components,
    // unique per directory; a directory has one name (the root none).
    let mut names: HashSet<(i64, &[u8])> = HashSet::new();
    let mut links: HashMap<i64, i64> = HashMap::new();
    let mut parent_of: HashMap<i64, i64> = HashMap::new();
    let mut subdirs: HashMap<i64, i64> = HashMap::new();
    for (p, name, ino) in &m.dirents {
        let shown = String::from_utf8_lossy(name);
        if kinds.get(p) != Some(&Kind::Dir) {
            return Err(format!(
                "name {shown:?} is in {p}, which is not a directory"
            ));
        }
        let Some(kind) = kinds.get(ino) else {
            return Err(format!("name {shown:?} names unknown inode {ino}"));
        };
        if name.is_empty()
            || name.len() > 255
            || name.contains(&b'/')
            || name.contains(&0)
            || name == b"."
            || name == b".."
        {
            return Err(format!("name {shown:?} in {p} is not a valid file name"));
        }
        if !names.insert((*p, name)) {
            return Err(format!("name {shown:?} appears twice in {p}"));
        }
        *links.entry(*ino).or_default() += 1;
        if *kind == Kind::Dir {
            if *ino == m.root || parent_of.insert(*ino, *p).is_some() {
                return Err(format!("directory {ino} has more than one parent"));
            }
            *subdirs.entry(*p).or_default() += 1;
        }
    }
    for n in &m.inodes {
        let named = links.get(&n.id).copied().unwrap_or(0);
        let kind = kinds[&n.id];
        if kind == Kind::Dir {
            if n.id != m.root && named == 0 {
                return Err(format!("directory {} has no name", n.id));
            }
            let want = 2 + subdirs.get(&n.id).copied().unwrap_or(0);
            if n.nlink != want {
                return Err(format!(
                    "directory {} has link count {}, its subdirectories make {want}",
                    n.id, n.nlink
                ));
            }
        } else if n.nlink != named {
            return Err(format!(
                "inode {} has link count {} but {named} names",
                n.id, n.nlink
            ));
        }
    }
    // Every directory reaches the root (so there is no cycle and nothing floats apart).
    for &d in parent_of.keys() {
        let mut cur = d;
        let mut steps = 0;
        while cur != m.root {
            cur = match parent_of.get(&cur) {
                Some(&p) => p,
                None => return Err(format!("directory {d} is not under the root")),
            };
            steps += 1;
            if steps > parent_of.len() {
                return Err(format!("directory {d} is in a cycle"));
            }
        }
    }
    for (ino, name, _) in &m.xattrs {
        if !kinds.contains_key(ino) {
            return Err(format!(
                "xattr {:?} is on unknown inode {ino}",
                String::from_utf8_lossy(name)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    fn inode(id: i64, kind: i64, nlink: i64) -> MInode {
        MInode {
            id,
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            atime: 0,
            mtime: 0,
            ctime: 0,
            nlink,
            rdev: 0,
            blob: None,
            target: None,
        }
    }

    /// root(1) / d(2) / f(3), f also named g in root (a hard link), l(4) a symlink.
    fn good() -> Manifest {
        let mut f = inode(3, 1, 2);
        f.blob = Some(H.into());
        f.size = 5;
        let mut l = inode(4, 3, 1);
        l.target = Some(b"d/f".to_vec());
        Manifest {
            version: MANIFEST_VERSION,
            volume: "v".into(),
            created: 0,
            root: 1,
            blobs: vec![(H.into(), 5)],
            inodes: vec![inode(1, 2, 3), inode(2, 2, 2), f, l],
            dirents: vec![
                (1, b"d".to_vec(), 2),
                (2, b"f".to_vec(), 3),
                (1, b"g".to_vec(), 3),
                (1, b"l".to_vec(), 4),
            ],
            xattrs: vec![(3, b"user.x".to_vec(), b"1".to_vec())],
        }
    }

    #[test]
    fn a_consistent_manifest_passes() {
        validate(&good()).unwrap();
    }

    /// Damages a good manifest in one way.
    type Breaker = Box<dyn Fn(&mut Manifest)>;

    #[test]
    fn every_inconsistency_is_named() {
        let cases: Vec<(&str, Breaker)> = vec![
            ("version 9", Box::new(|m| m.version = 9)),
            ("not a BLAKE3", Box::new(|m| m.blobs[0].0 = "zz".into())),
            ("kind 42", Box::new(|m| m.inodes[1].kind = 42)),
            ("listed twice", Box::new(|m| m.inodes[1].id = 1)),
            ("has 5 bytes", Box::new(|m| m.inodes[2].size = 6)),
            ("not in the blob list", Box::new(|m| m.blobs.clear())),
            (
                "link count 1 but 2 names",
                Box::new(|m| m.inodes[2].nlink = 1),
            ),
            ("subdirectories make 3", Box::new(|m| m.inodes[0].nlink = 2)),
            ("not a directory of", Box::new(|m| m.root = 3)),
            ("unknown inode 99", Box::new(|m| m.dirents[1].2 = 99)),
            ("which is not a directory", Box::new(|m| m.dirents[1].0 = 3)),
            (
                "appears twice",
                Box::new(|m| m.dirents[2].1 = b"d".to_vec()),
            ),
            (
                "not a valid file name",
                Box::new(|m| m.dirents[1].1 = b"a/b".to_vec()),
            ),
            ("needs a target", Box::new(|m| m.inodes[3].target = None)),
            ("xattr", Box::new(|m| m.xattrs[0].0 = 77)),
            (
                "has no name",
                Box::new(|m| {
                    m.dirents.remove(0);
                    m.inodes[0].nlink = 2;
                }),
            ),
            (
                "more than one parent",
                Box::new(|m| {
                    m.dirents.push((2, b"loop".to_vec(), 2));
                    m.inodes[1].nlink = 3;
                }),
            ),
        ];
        for (want, break_it) in cases {
            let mut m = good();
            break_it(&mut m);
            let e = validate(&m).expect_err(want);
            assert!(e.contains(want), "expected {want:?}, got {e:?}");
        }
    }

    #[test]
    fn a_directory_cycle_apart_from_the_root_is_refused() {
        let mut m = good();
        // 5 and 6 name each other: each has one parent, neither reaches the root.
        m.inodes.push(inode(5, 2, 3));
        m.inodes.push(inode(6, 2, 3));
        m.dirents.push((5, b"a".to_vec(), 6));
        m.dirents.push((6, b"b".to_vec(), 5));
        let e = validate(&m).unwrap_err();
        assert!(
            e.contains("cycle") || e.contains("not under the root"),
            "{e}"
        );
    }
}
