//! A merge pull: a checked snapshot manifest joins an existing volume in one transaction.
//!
//! The snapshot's tree is walked from its root beside the volume's. A name only the snapshot
//! has is added (a new inode; a new directory brings its whole subtree); a name only the
//! volume has stays; directories on both sides are merged; a name both have with the same
//! content is unchanged. Any other name is a conflict: the volume's entry is kept, or with
//! `theirs` the snapshot's replaces it the way a rename over it would (the old inode loses
//! that name; at link count 0 it lives on while open and is purged afterwards). A directory
//! against a non-directory is never replaced: that would drop a whole tree, or hide one.
//!
//! Installed names of one snapshot inode share one new inode (hard links stay hard links
//! among the names the merge installs); its link count is the names it got. New inodes
//! take the snapshot's mode, owner, times and xattrs; kept and unchanged names, and merged
//! directories, keep the volume's (an empty volume's root takes the snapshot root's). Blob references are taken as a replace pull takes them (a blob not local is
//! remote-only, fetched on first open); a replaced inode keeps its reference until purged.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, OptionalExtension};

use crate::error::{Error, Result};
use crate::manifest::{MInode, Manifest};
use crate::snapshot::{NameChange, PullReport, Pulled};
use crate::{now_ns, Hash, Ino, Kind, Store};

/// How many conflicting paths a report lists.
const CONFLICTS_LISTED: usize = 20;

/// What a local name holds, as far as "same content" goes.
struct Local {
    ino: Ino,
    kind: Kind,
    size: i64,
    blob: Option<Hash>,
    target: Option<Vec<u8>>,
    rdev: i64,
}

fn local_entry(tx: &rusqlite::Connection, dir: Ino, name: &[u8]) -> Result<Option<Local>> {
    Ok(tx
        .prepare_cached(
            "SELECT i.ino, i.kind, i.size, i.blob, i.target, i.rdev
             FROM dirents d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ?1 AND d.name = ?2",
        )?
        .query_row(params![dir as i64, name], |r| {
            Ok(Local {
                ino: r.get::<_, i64>(0)? as Ino,
                kind: r.get(1)?,
                size: r.get(2)?,
                blob: r.get(3)?,
                target: r.get(4)?,
                rdev: r.get(5)?,
            })
        })
        .optional()?)
}

/// True when a local non-directory and a snapshot inode of the same kind hold the same thing.
fn same_content(l: &Local, n: &MInode, kind: Kind) -> bool {
    if l.kind != kind {
        return false;
    }
    match kind {
        Kind::File => {
            l.size == n.size && l.blob.map(|h| h.to_hex()).as_deref() == n.blob.as_deref()
        }
        Kind::Symlink => l.target == n.target,
        Kind::CharDev | Kind::BlockDev => l.rdev == n.rdev,
        _ => true,
    }
}

/// An xattr of the manifest: (name, value).
type XattrRef<'m> = (&'m [u8], &'m [u8]);

/// The manifest, indexed for the walk.
struct Index<'m> {
    inodes: HashMap<i64, (&'m MInode, Kind)>,
    children: HashMap<i64, Vec<(&'m [u8], i64)>>,
    xattrs: HashMap<i64, Vec<XattrRef<'m>>>,
}

impl<'m> Index<'m> {
    fn new(m: &'m Manifest) -> Result<Index<'m>> {
        let mut inodes = HashMap::new();
        for n in &m.inodes {
            let kind = Kind::from_code(n.kind)
                .ok_or_else(|| Error::Remote(format!("manifest: inode {} kind", n.id)))?;
            inodes.insert(n.id, (n, kind));
        }
        let mut children: HashMap<i64, Vec<(&[u8], i64)>> = HashMap::new();
        for (p, name, ino) in &m.dirents {
            children.entry(*p).or_default().push((name, *ino));
        }
        let mut xattrs: HashMap<i64, Vec<XattrRef>> = HashMap::new();
        for (ino, name, value) in &m.xattrs {
            xattrs.entry(*ino).or_default().push((name, value));
        }
        Ok(Index {
            inodes,
            children,
            xattrs,
        })
    }

    fn inode(&self, id: i64) -> Result<(&'m MInode, Kind)> {
        self.inodes
            .get(&id)
            .copied()
            .ok_or_else(|| Error::Remote(format!("manifest names unknown inode {id}")))
    }
}

/// The merge's state inside its transaction.
struct Merge<'a, 'm> {
    tx: &'a rusqlite::Connection,
    ix: Index<'m>,
    volume: i64,
    now: i64,
    /// Snapshot inode → the new local inode its installed names share.
    made: HashMap<i64, Ino>,
    /// References the new inodes take, per blob.
    refs: HashMap<String, i64>,
    /// Directories the merge created (nothing in them needs telling the kernel).
    new_dirs: HashSet<Ino>,
    /// Existing directories whose entries changed.
    touched: HashSet<Ino>,
    report: PullReport,
    changed: Vec<NameChange>,
}

impl Merge<'_, '_> {
    /// A new local inode for snapshot inode `id` (a directory under `parent`), with no
    /// name yet (a directory has its own two links).
    fn make(&mut self, id: i64, parent: Ino) -> Result<Ino> {
        let (n, kind) = self.ix.inode(id)?;
        let blob = match &n.blob {
            Some(hex) => {
                let h = Hash::from_hex(hex)
                    .ok_or_else(|| Error::Remote(format!("bad blob hash {hex}")))?;
                *self.refs.entry(hex.clone()).or_default() += 1;
                Some(h.0.to_vec())
            }
            None => None,
        };
        let is_dir = kind == Kind::Dir;
        self.tx
            .prepare_cached(
                "INSERT INTO inodes (volume, kind, mode, uid, gid, size, atime, mtime, ctime,
                                     nlink, rdev, parent, blob, target)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                self.volume,
                n.kind,
                n.mode,
                n.uid,
                n.gid,
                n.size,
                n.atime,
                n.mtime,
                n.ctime,
                if is_dir { 2 } else { 0 },
                n.rdev,
                is_dir.then_some(parent as i64),
                blob,
                n.target
            ])?;
        let ino = self.tx.last_insert_rowid() as Ino;
        if let Some(xs) = self.ix.xattrs.get(&id) {
            let mut x = self
                .tx
                .prepare_cached("INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)")?;
            for (name, value) in xs {
                x.execute(params![ino as i64, name, value])?;
            }
        }
        if kind == Kind::File {
            self.report.files += 1;
        }
        if is_dir {
            self.new_dirs.insert(ino);
        }
        Ok(ino)
    }

    /// Names snapshot inode `id` `dir/name` (a name free now); returns the local inode.
    fn install(&mut self, dir: Ino, name: &[u8], id: i64) -> Result<Ino> {
        let (_, kind) = self.ix.inode(id)?;
        let ino = match (kind, self.made.get(&id)) {
            (Kind::Dir, _) | (_, None) => {
                let ino = self.make(id, dir)?;
                if kind != Kind::Dir {
                    self.made.insert(id, ino);
                }
                ino
            }
            (_, Some(&ino)) => ino,
        };
        self.tx
            .prepare_cached("INSERT INTO dirents (parent, name, ino) VALUES (?1, ?2, ?3)")?
            .execute(params![dir as i64, name, ino as i64])?;
        let counted = if kind == Kind::Dir { dir } else { ino };
        self.tx
            .prepare_cached("UPDATE inodes SET nlink = nlink + 1 WHERE ino = ?1")?
            .execute([counted as i64])?;
        Ok(ino)
    }

    fn conflict(&mut self, path: &str) {
        if self.report.conflicts.len() < CONFLICTS_LISTED {
            self.report.conflicts.push(path.to_owned());
        }
    }

    /// Walks snapshot directory `sdir` beside local directory `ldir`.
    fn run(&mut self, sroot: i64, lroot: Ino, theirs: bool) -> Result<()> {
        let mut stack = vec![(sroot, lroot, String::new())];
        while let Some((sdir, ldir, path)) = stack.pop() {
            let kids = self.ix.children.get(&sdir).cloned().unwrap_or_default();
            let fresh = self.new_dirs.contains(&ldir);
            // Names of this directory before the merge; those the snapshot also has are
            // taken off as they are met, and the rest are the volume's own.
            let mut own: u64 = if fresh {
                0
            } else {
                self.tx
                    .prepare_cached("SELECT count(*) FROM dirents WHERE parent = ?1")?
                    .query_row([ldir as i64], |r| r.get::<_, i64>(0))? as u64
            };
            for (name, id) in kids {
                let (n, kind) = self.ix.inode(id)?;
                let shown = format!("{path}{}", String::from_utf8_lossy(name));
                let local = if fresh {
                    None
                } else {
                    local_entry(self.tx, ldir, name)?
                };
                if local.is_some() {
                    own = own.saturating_sub(1);
                }
                match local {
                    None => {
                        let ino = self.install(ldir, name, id)?;
                        self.report.added += 1;
                        if !fresh {
                            self.touched.insert(ldir);
                            self.changed.push(NameChange {
                                parent: ldir,
                                name: name.to_vec(),
                                replaced: None,
                            });
                        }
                        if kind == Kind::Dir {
                            stack.push((id, ino, format!("{shown}/")));
                        }
                    }
                    Some(l) if l.kind == Kind::Dir && kind == Kind::Dir => {
                        stack.push((id, l.ino, format!("{shown}/")));
                    }
                    Some(l) if kind != Kind::Dir && same_content(&l, n, kind) => {
                        self.report.unchanged += 1;
                    }
                    Some(_) if !theirs => {
                        self.report.kept += 1;
                        self.conflict(&shown);
                    }
                    Some(l) if l.kind == Kind::Dir || kind == Kind::Dir => {
                        self.report.skipped += 1;
                        self.conflict(&shown);
                    }
                    Some(l) => {
                        // As a rename over it: the old inode loses this name only.
                        let nlink = crate::ns::drop_link(self.tx, ldir, name, l.ino, self.now)?;
                        self.install(ldir, name, id)?;
                        self.report.updated += 1;
                        self.touched.insert(ldir);
                        self.changed.push(NameChange {
                            parent: ldir,
                            name: name.to_vec(),
                            replaced: Some((l.ino, nlink)),
                        });
                    }
                }
            }
            self.report.local_only += own;
        }
        Ok(())
    }
}

impl Store {
    /// Merges a validated manifest into volume `volume` in one transaction (see the module
    /// comment); a volume that does not exist yet is simply made the snapshot.
    pub(crate) fn merge_manifest(
        &self,
        m: &Manifest,
        volume: &str,
        mhash: &str,
        theirs: bool,
        before_commit: &mut dyn FnMut(&[NameChange]),
    ) -> Result<Pulled> {
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        let found: Option<(i64, i64)> = tx
            .query_row(
                "SELECT id, root FROM volumes WHERE name = ?1",
                [volume],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((vid, root)) = found else {
            drop(tx);
            drop(conn);
            return Ok(Pulled {
                report: self.install_manifest(m, volume, mhash, "merge")?,
                changed: Vec::new(),
            });
        };
        let mut mg = Merge {
            tx: &tx,
            ix: Index::new(m)?,
            volume: vid,
            now: now_ns(),
            made: HashMap::new(),
            refs: HashMap::new(),
            new_dirs: HashSet::new(),
            touched: HashSet::new(),
            report: PullReport {
                manifest: mhash.to_owned(),
                mode: "merge".into(),
                ..Default::default()
            },
            changed: Vec::new(),
        };
        let empty: bool = tx.query_row(
            "SELECT NOT EXISTS (SELECT 1 FROM dirents WHERE parent = ?1)",
            [root],
            |r| r.get(0),
        )?;
        if empty {
            // Nothing to keep: an empty volume (a fresh store's) takes the snapshot's root
            // as it is, attributes and xattrs included, as a replace would.
            let (n, _) = mg.ix.inode(m.root)?;
            tx.execute(
                "UPDATE inodes SET mode = ?2, uid = ?3, gid = ?4, atime = ?5, mtime = ?6,
                 ctime = ?7 WHERE ino = ?1",
                params![root, n.mode, n.uid, n.gid, n.atime, n.mtime, n.ctime],
            )?;
            for (name, value) in mg.ix.xattrs.get(&m.root).into_iter().flatten() {
                tx.execute(
                    "INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)",
                    params![root, name, value],
                )?;
            }
        }
        mg.run(m.root, root as Ino, theirs)?;
        let sizes: HashMap<&String, u64> = m.blobs.iter().map(|(h, s)| (h, *s)).collect();
        for (hex, n) in &mg.refs {
            let size = *sizes
                .get(hex)
                .ok_or_else(|| Error::Remote(format!("manifest lacks the size of blob {hex}")))?;
            let h = Hash::from_hex(hex).expect("checked when the inode was made");
            if crate::lifecycle::pull_ref(&tx, &h, size, *n)? == crate::BlobState::RemoteOnly {
                mg.report.blobs_remote += 1;
            }
        }
        mg.report.blobs = mg.refs.len() as u64;
        if empty {
            mg.touched.remove(&(root as Ino));
        }
        for d in &mg.touched {
            crate::ns::touch_dir(&tx, *d, mg.now)?;
        }
        let Merge {
            report, changed, ..
        } = mg;
        before_commit(&changed);
        self.commit_tx(tx)?;
        Ok(Pulled { report, changed })
    }
}
