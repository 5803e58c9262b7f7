//! The union of two snapshots, for additive pushes: a push publishes its own volume merged
//! with what the tag already holds, so that machines pushing to one tag add to each other
//! instead of replacing each other.
//!
//! The rule, path by path: a name in `ours` is taken from `ours` (its content, mode, owner and
//! xattrs; for a directory, its entries are merged in turn); a name only in `base` is kept from
//! `base`, with everything under it. Where `ours` has a file and `base` a directory at one
//! path (or the other way round), `ours` wins and `base`'s subtree there is left out. Nothing
//! is ever deleted by a push: a name `ours` lacks is kept from `base`.

use std::collections::{HashMap, HashSet};

use crate::manifest::{MInode, Manifest};
use crate::Kind;

/// `ours` with every name of `base` that `ours` lacks. Both must be valid manifests (see
/// `manifest::validate`); so is the result.
pub(crate) fn union(base: &Manifest, ours: &Manifest) -> Manifest {
    let dir = Kind::Dir.code();
    let base_inodes: HashMap<i64, &MInode> = base.inodes.iter().map(|n| (n.id, n)).collect();
    let mut base_children: HashMap<i64, Vec<(&[u8], i64)>> = HashMap::new();
    for (p, name, c) in &base.dirents {
        base_children.entry(*p).or_default().push((name, *c));
    }
    let mut our_children: HashMap<i64, HashMap<Vec<u8>, i64>> = HashMap::new();
    for (p, name, c) in &ours.dirents {
        our_children.entry(*p).or_default().insert(name.clone(), *c);
    }
    let our_kinds: HashMap<i64, i64> = ours.inodes.iter().map(|n| (n.id, n.kind)).collect();

    let mut out = Manifest {
        version: ours.version,
        volume: ours.volume.clone(),
        created: ours.created,
        root: ours.root,
        blobs: ours.blobs.clone(),
        inodes: ours.inodes.clone(),
        dirents: ours.dirents.clone(),
        xattrs: ours.xattrs.clone(),
    };
    let mut next_id = ours.inodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
    // Base inode id -> its id in the result, for inodes taken from `base` (hard links keep
    // one inode).
    let mut taken: HashMap<i64, i64> = HashMap::new();

    // (base directory, our directory) pairs to merge; a stack instead of recursion so a
    // deep tree cannot exhaust the stack.
    let mut merge = vec![(base.root, ours.root)];
    // (base inode, our parent, name) to add with everything under it.
    let mut add: Vec<(i64, i64, Vec<u8>)> = Vec::new();
    while let Some((bdir, odir)) = merge.pop() {
        for &(name, bchild) in base_children.get(&bdir).into_iter().flatten() {
            match our_children.get(&odir).and_then(|c| c.get(name)) {
                Some(&ochild) => {
                    let both_dirs = base_inodes.get(&bchild).is_some_and(|n| n.kind == dir)
                        && our_kinds.get(&ochild) == Some(&dir);
                    if both_dirs {
                        merge.push((bchild, ochild));
                    }
                    // Otherwise ours wins the name.
                }
                None => add.push((bchild, odir, name.to_vec())),
            }
        }
    }
    while let Some((bchild, parent, name)) = add.pop() {
        let Some(n) = base_inodes.get(&bchild) else {
            continue;
        };
        let id = match taken.get(&bchild) {
            Some(&id) => id,
            None => {
                let id = next_id;
                next_id += 1;
                taken.insert(bchild, id);
                let mut copy = (*n).clone();
                copy.id = id;
                out.inodes.push(copy);
                if n.kind == dir {
                    for &(cname, c) in base_children.get(&bchild).into_iter().flatten() {
                        add.push((c, id, cname.to_vec()));
                    }
                }
                id
            }
        };
        out.dirents.push((parent, name, id));
    }

    // What came from `base` brings its xattrs and blobs.
    for (ino, k, v) in &base.xattrs {
        if let Some(&id) = taken.get(ino) {
            out.xattrs.push((id, k.clone(), v.clone()));
        }
    }
    let mut have: HashSet<String> = out.blobs.iter().map(|b| b.0.clone()).collect();
    let used: HashSet<&str> = out
        .inodes
        .iter()
        .filter_map(|n| n.blob.as_deref())
        .collect();
    for (h, size) in &base.blobs {
        if used.contains(h.as_str()) && have.insert(h.clone()) {
            out.blobs.push((h.clone(), *size));
        }
    }

    // Link counts from the names the result has: a directory has 2 and one per
    // subdirectory; anything else one per name.
    let mut names: HashMap<i64, i64> = HashMap::new();
    let mut subdirs: HashMap<i64, i64> = HashMap::new();
    let kinds: HashMap<i64, i64> = out.inodes.iter().map(|n| (n.id, n.kind)).collect();
    for (p, _, c) in &out.dirents {
        *names.entry(*c).or_default() += 1;
        if kinds.get(c) == Some(&dir) {
            *subdirs.entry(*p).or_default() += 1;
        }
    }
    for n in &mut out.inodes {
        n.nlink = if n.kind == dir {
            2 + subdirs.get(&n.id).copied().unwrap_or(0)
        } else {
            names.get(&n.id).copied().unwrap_or(0)
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{validate, MANIFEST_VERSION};

    fn inode(id: i64, kind: Kind, blob: Option<(&str, i64)>) -> MInode {
        MInode {
            id,
            kind: kind.code(),
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: blob.map_or(0, |b| b.1),
            atime: 0,
            mtime: 0,
            ctime: 0,
            nlink: 1,
            rdev: 0,
            blob: blob.map(|b| b.0.to_owned()),
            target: None,
        }
    }

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    /// A manifest from (parent, name, id, kind, blob char) rows under root 1.
    fn tree(rows: &[(i64, &str, i64, Kind, Option<char>)]) -> Manifest {
        let mut inodes = vec![inode(1, Kind::Dir, None)];
        let mut dirents = Vec::new();
        let mut blobs: Vec<(String, u64)> = Vec::new();
        let mut seen = HashSet::new();
        for &(p, name, id, kind, b) in rows {
            if seen.insert(id) {
                let h = b.map(hex);
                inodes.push(inode(id, kind, h.as_deref().map(|h| (h, 3))));
                if let Some(h) = h {
                    if !blobs.iter().any(|x| x.0 == h) {
                        blobs.push((h, 3));
                    }
                }
            }
            dirents.push((p, name.as_bytes().to_vec(), id));
        }
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            volume: "v".into(),
            created: 0,
            root: 1,
            blobs,
            inodes,
            dirents,
            xattrs: vec![],
        };
        // Link counts as union() computes them, so the inputs are valid too.
        let empty = Manifest {
            version: MANIFEST_VERSION,
            volume: "v".into(),
            created: 0,
            root: 1,
            blobs: vec![],
            inodes: vec![inode(1, Kind::Dir, None)],
            dirents: vec![],
            xattrs: vec![],
        };
        m = union(&empty, &m);
        validate(&m).unwrap();
        m
    }

    /// Every path of a manifest with what it holds ("dir", or the blob's first hex digit).
    fn paths(m: &Manifest) -> Vec<String> {
        let by_id: HashMap<i64, &MInode> = m.inodes.iter().map(|n| (n.id, n)).collect();
        let mut out = Vec::new();
        let mut stack = vec![(m.root, String::new())];
        while let Some((d, prefix)) = stack.pop() {
            for (p, name, c) in &m.dirents {
                if *p != d {
                    continue;
                }
                let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
                let n = by_id[c];
                if n.kind == Kind::Dir.code() {
                    out.push(format!("{path} dir"));
                    stack.push((*c, path));
                } else {
                    let b = n.blob.as_deref().map_or("-".into(), |h| h[..1].to_string());
                    out.push(format!("{path} {b} links={}", n.nlink));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn names_only_in_the_base_are_kept_ours_win_the_rest() {
        let base = tree(&[
            (1, "a", 2, Kind::File, Some('a')),
            (1, "shared", 3, Kind::Dir, None),
            (3, "from-base", 4, Kind::File, Some('b')),
            (3, "both", 5, Kind::File, Some('c')),
            (1, "clash", 6, Kind::Dir, None),
            (6, "under", 7, Kind::File, Some('d')),
        ]);
        let ours = tree(&[
            (1, "shared", 2, Kind::Dir, None),
            (2, "both", 3, Kind::File, Some('e')),
            (2, "mine", 4, Kind::File, Some('f')),
            (1, "clash", 5, Kind::File, Some('0')),
        ]);
        let u = union(&base, &ours);
        validate(&u).unwrap();
        assert_eq!(
            paths(&u),
            [
                "/a a links=1",
                "/clash 0 links=1",
                "/shared dir",
                "/shared/both e links=1",
                "/shared/from-base b links=1",
                "/shared/mine f links=1",
            ]
        );
        // The blob list holds exactly what the names use.
        let mut blobs: Vec<char> = u
            .blobs
            .iter()
            .map(|b| b.0.chars().next().unwrap())
            .collect();
        blobs.sort();
        assert_eq!(blobs, ['0', 'a', 'b', 'e', 'f']);
    }

    #[test]
    fn hard_links_stay_one_inode_and_directories_count_their_new_subdirectories() {
        let base = tree(&[
            (1, "d", 2, Kind::Dir, None),
            (2, "x", 3, Kind::File, Some('a')),
            (2, "y", 3, Kind::File, Some('a')),
            (2, "sub", 4, Kind::Dir, None),
        ]);
        let ours = tree(&[
            (1, "d", 2, Kind::Dir, None),
            (2, "y", 3, Kind::File, Some('b')),
        ]);
        let u = union(&base, &ours);
        validate(&u).unwrap();
        assert_eq!(
            paths(&u),
            ["/d dir", "/d/sub dir", "/d/x a links=1", "/d/y b links=1"]
        );
        let d = u.dirents.iter().find(|e| e.1 == b"d").map(|e| e.2).unwrap();
        assert_eq!(u.inodes.iter().find(|n| n.id == d).unwrap().nlink, 3);
        // Both names of a linked file come over as one inode.
        let ours = tree(&[]);
        let u = union(&base, &ours);
        validate(&u).unwrap();
        assert!(paths(&u).contains(&"/d/x a links=2".to_string()));
    }

    #[test]
    fn a_union_with_itself_changes_nothing_and_an_empty_base_gives_ours() {
        let m = tree(&[
            (1, "a", 2, Kind::File, Some('a')),
            (1, "d", 3, Kind::Dir, None),
            (3, "b", 4, Kind::File, Some('b')),
        ]);
        assert_eq!(paths(&union(&m, &m)), paths(&m));
        assert_eq!(union(&m, &m).inodes.len(), m.inodes.len());
        let empty = tree(&[]);
        assert_eq!(paths(&union(&empty, &m)), paths(&m));
    }
}
