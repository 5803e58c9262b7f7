//! Namespace transactions: volumes, inodes, directory entries, xattrs and reference counts.
//!
//! Every public method is one SQLite transaction, so a crash at any point leaves either the old
//! or the new namespace, never a half-done rename or a wrong link count.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::error::{Error, Result};
use crate::{now_ns, Hash, Ino, Inode, Kind, NewNode, Store};

/// The columns `row_to_inode_at` reads, from `inodes` aliased `i`: the last one is the
/// measured allocation of the inode's blob (a primary-key lookup), for st_blocks.
const INODE_COLS: &str = "i.ino, i.volume, i.kind, i.mode, i.uid, i.gid, i.size, i.atime, \
     i.mtime, i.ctime, i.nlink, i.rdev, i.parent, i.blob, i.target, \
     (SELECT b.blocks FROM blobs b WHERE b.hash = i.blob)";

/// A volume: one independent tree in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: i64,
    pub name: String,
    pub root: Ino,
}

/// Attribute changes; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<i64>,
    pub mtime: Option<i64>,
    pub ctime: Option<i64>,
}

/// Result of a rename: the inode whose last-but-one name was replaced, if any, with its new
/// link count (0 means the caller may purge it once nothing holds it).
#[derive(Clone, Debug, Default)]
pub struct Renamed {
    pub replaced: Option<(Ino, u32)>,
}

/// Numbers for `kcache stats`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// What the local blob files take on disk: less than their bytes when sparse (blobs
    /// never measured count at their size, see migration 5).
    pub disk_bytes: u64,
    pub blobs: u64,
    pub dedup_saved_bytes: u64,
    pub quarantined_blobs: u64,
    /// Bytes of blobs on local disk: what the quota limits.
    pub usage_bytes: u64,
    pub quota_bytes: Option<u64>,
    pub low_watermark_bytes: Option<u64>,
    /// Free space kept on the store's disk, as configured ("10%" or bytes).
    pub min_free: String,
    pub pinned_bytes: u64,
    pub pins: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub opens: u64,
    /// Bytes read through the daemon (reads the kernel passes through are not seen).
    pub bytes_read: u64,
    pub bytes_written: u64,
}

fn row_to_inode(r: &Row<'_>) -> rusqlite::Result<Inode> {
    row_to_inode_at(r, 0)
}

/// Reads the `INODE_COLS` columns starting at column `b`.
fn row_to_inode_at(r: &Row<'_>, b: usize) -> rusqlite::Result<Inode> {
    Ok(Inode {
        ino: r.get::<_, i64>(b)? as u64,
        volume: r.get(b + 1)?,
        kind: r.get(b + 2)?,
        mode: r.get::<_, i64>(b + 3)? as u32,
        uid: r.get::<_, i64>(b + 4)? as u32,
        gid: r.get::<_, i64>(b + 5)? as u32,
        size: r.get::<_, i64>(b + 6)? as u64,
        atime: r.get(b + 7)?,
        mtime: r.get(b + 8)?,
        ctime: r.get(b + 9)?,
        nlink: r.get::<_, i64>(b + 10)? as u32,
        rdev: r.get::<_, i64>(b + 11)? as u32,
        parent: r.get::<_, Option<i64>>(b + 12)?.map(|p| p as u64),
        blob: r.get(b + 13)?,
        target: r.get(b + 14)?,
        blob_blocks: r
            .get::<_, Option<i64>>(b + 15)?
            .map(|n| crate::codec::unsigned(n, "blobs.blocks"))
            .transpose()?,
    })
}

fn get_inode(conn: &Connection, ino: Ino) -> Result<Option<Inode>> {
    // Built once: the statement cache is keyed by the SQL text, and formatting it on every
    // call showed in profiles.
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("SELECT {INODE_COLS} FROM inodes i WHERE i.ino = ?1"));
    let mut stmt = conn.prepare_cached(&SQL)?;
    Ok(stmt.query_row([ino as i64], row_to_inode).optional()?)
}

pub(crate) fn must_inode(conn: &Connection, ino: Ino) -> Result<Inode> {
    get_inode(conn, ino)?.ok_or(Error::NotFound)
}

fn must_dir(conn: &Connection, ino: Ino) -> Result<Inode> {
    let d = must_inode(conn, ino)?;
    if d.kind != Kind::Dir {
        return Err(Error::NotDir);
    }
    if d.nlink == 0 {
        // A removed directory can still be someone's cwd; nothing may be created in it.
        return Err(Error::NotFound);
    }
    Ok(d)
}

/// An inode's kind and link count, without the rest of its row.
fn links_of(conn: &Connection, ino: Ino) -> Result<(Kind, u32)> {
    let row = conn
        .prepare_cached("SELECT kind, nlink FROM inodes WHERE ino = ?1")?
        .query_row([ino as i64], |r| {
            Ok((r.get::<_, Kind>(0)?, r.get::<_, i64>(1)? as u32))
        })
        .optional()?;
    row.ok_or(Error::NotFound)
}

fn lookup_ino(conn: &Connection, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
    let mut stmt =
        conn.prepare_cached("SELECT ino FROM dirents WHERE parent = ?1 AND name = ?2")?;
    Ok(stmt
        .query_row(params![parent as i64, name], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|i| i as u64))
}

pub(crate) fn touch_dir(conn: &Connection, dir: Ino, now: i64) -> Result<()> {
    conn.prepare_cached("UPDATE inodes SET mtime = ?2, ctime = ?2 WHERE ino = ?1")?
        .execute(params![dir as i64, now])?;
    Ok(())
}

fn is_empty_dir(conn: &Connection, dir: Ino) -> Result<bool> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM dirents WHERE parent = ?1 LIMIT 1")?;
    Ok(stmt
        .query_row([dir as i64], |_| Ok(()))
        .optional()?
        .is_none())
}

/// Drops one reference to a blob; records it in `dead` when that was the last.
pub(crate) fn unref_blob(
    tx: &rusqlite::Connection,
    hash: &Hash,
    dead: &mut Vec<Hash>,
) -> Result<()> {
    tx.prepare_cached("UPDATE blobs SET refs = refs - 1 WHERE hash = ?1")?
        .execute([&hash.0[..]])?;
    let refs: Option<i64> = tx
        .prepare_cached("SELECT refs FROM blobs WHERE hash = ?1")?
        .query_row([&hash.0[..]], |r| r.get(0))
        .optional()?;
    if refs.is_some_and(|r| r <= 0) {
        tx.prepare_cached("DELETE FROM blobs WHERE hash = ?1")?
            .execute([&hash.0[..]])?;
        tx.prepare_cached("INSERT OR IGNORE INTO dead_blobs (hash) VALUES (?1)")?
            .execute([&hash.0[..]])?;
        dead.push(*hash);
    }
    Ok(())
}

/// Removes one name; returns the inode it named and that inode's new link count.
pub(crate) fn drop_link(
    tx: &rusqlite::Connection,
    parent: Ino,
    name: &[u8],
    ino: Ino,
    now: i64,
) -> Result<u32> {
    tx.prepare_cached("DELETE FROM dirents WHERE parent = ?1 AND name = ?2")?
        .execute(params![parent as i64, name])?;
    let node = must_inode(tx, ino)?;
    // A directory's own "." link goes with its name.
    let nlink = if node.kind == Kind::Dir {
        tx.prepare_cached("UPDATE inodes SET nlink = nlink - 1 WHERE ino = ?1")?
            .execute([parent as i64])?;
        0
    } else {
        node.nlink.saturating_sub(1)
    };
    tx.prepare_cached("UPDATE inodes SET nlink = ?2, ctime = ?3 WHERE ino = ?1")?
        .execute(params![ino as i64, nlink as i64, now])?;
    Ok(nlink)
}

impl Store {
    /// The volume called `name`, created (with an empty root owned by `uid:gid`) if `create`.
    pub fn volume(&self, name: &str, create: bool, uid: u32, gid: u32) -> Result<VolumeInfo> {
        let conn = self.conn();
        let found = conn
            .query_row(
                "SELECT id, name, root FROM volumes WHERE name = ?1",
                [name],
                |r| {
                    Ok(VolumeInfo {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        root: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()?;
        if let Some(v) = found {
            return Ok(v);
        }
        if !create || self.read_only {
            return Err(Error::NoVolume(name.to_owned()));
        }
        if name.is_empty() || name.len() > 128 || name.contains('/') {
            return Err(Error::Invalid("volume names are 1-128 bytes without '/'"));
        }
        let tx = self.begin_tx(&conn)?;
        let now = now_ns();
        tx.prepare_cached("INSERT INTO volumes (name, root, created) VALUES (?1, 0, ?2)")?
            .execute(params![name, now])?;
        let id = tx.last_insert_rowid();
        tx.prepare_cached(
            "INSERT INTO inodes (volume, kind, mode, uid, gid, atime, mtime, ctime, nlink)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6, 2)",
        )?
        .execute(params![id, Kind::Dir, 0o755, uid, gid, now])?;
        let root = tx.last_insert_rowid();
        tx.prepare_cached("UPDATE volumes SET root = ?2 WHERE id = ?1")?
            .execute(params![id, root])?;
        self.commit_tx(tx)?;
        Ok(VolumeInfo {
            id,
            name: name.to_owned(),
            root: root as u64,
        })
    }

    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, name, root FROM volumes ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(VolumeInfo {
                id: r.get(0)?,
                name: r.get(1)?,
                root: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Store-wide numbers (all volumes).
    pub fn stats(&self) -> Result<Stats> {
        let conn = self.conn();
        let mut s = Stats::default();
        conn.query_row(
            "SELECT
               coalesce(sum(kind = 1), 0), coalesce(sum(kind = 2), 0), coalesce(sum(kind = 3), 0),
               coalesce(sum(CASE WHEN kind = 1 THEN size ELSE 0 END), 0)
             FROM inodes WHERE nlink > 0",
            [],
            |r| {
                s.files = r.get::<_, i64>(0)? as u64;
                s.directories = r.get::<_, i64>(1)? as u64;
                s.symlinks = r.get::<_, i64>(2)? as u64;
                s.logical_bytes = r.get::<_, i64>(3)? as u64;
                Ok(())
            },
        )?;
        conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(state = ?2), 0),
               coalesce(sum(CASE WHEN state = ?1 THEN coalesce(blocks * 512, size) END), 0)
             FROM blobs",
            [crate::lifecycle::LOCAL, crate::lifecycle::QUARANTINED],
            |r| {
                s.blobs = r.get::<_, i64>(0)? as u64;
                s.stored_bytes = r.get::<_, i64>(1)? as u64;
                s.quarantined_blobs = r.get::<_, i64>(2)? as u64;
                s.disk_bytes = r.get::<_, i64>(3)? as u64;
                Ok(())
            },
        )?;
        // Logical bytes count hard links once per inode; savings are what dedup spared.
        let referenced: i64 = conn.query_row(
            "SELECT coalesce(sum(size), 0) FROM inodes WHERE blob IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        s.dedup_saved_bytes = (referenced as u64).saturating_sub(s.stored_bytes);
        s.pins = conn.query_row("SELECT count(*) FROM pins", [], |r| r.get::<_, i64>(0))? as u64;
        drop(conn);
        s.usage_bytes = self.stored_bytes()?;
        let limits = self.limits()?;
        s.quota_bytes = limits.quota;
        s.low_watermark_bytes = limits.low_watermark();
        s.min_free = limits.min_free.to_string();
        s.pinned_bytes = self.pinned_blobs()?.1;
        let c = self.counters()?;
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        s.evictions = get("evictions");
        s.evicted_bytes = get("evicted_bytes");
        s.opens = get("opens");
        s.bytes_read = get("bytes_read");
        s.bytes_written = get("bytes_written");
        Ok(s)
    }

    /// Makes every namespace change committed so far durable on disk (fsync of a directory).
    /// Commits run with synchronous=NORMAL, which survives a crash of the process but not of
    /// the machine; one small FULL transaction syncs the whole write-ahead log.
    pub fn sync(&self) -> Result<()> {
        // The open group is committed first; the FULL transaction then syncs it too.
        let conn = self.conn_direct()?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let res = conn
            .prepare_cached(
                "INSERT INTO counters (name, value) VALUES ('namespace_syncs', 1)
             ON CONFLICT (name) DO UPDATE SET value = value + 1",
            )?
            .execute([]);
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        res?;
        Ok(())
    }

    /// The namespace: names, inodes, attributes and xattrs of every volume.
    pub fn ns(&self) -> Namespace<'_> {
        Namespace { store: self }
    }
}

/// The namespace of a store's volumes: directories, names, inodes, attributes and xattrs,
/// each operation one transaction on the store's connection. A view over the store (which
/// owns the connection); `Store::ns` gives one.
#[derive(Clone, Copy)]
pub struct Namespace<'s> {
    store: &'s Store,
}

impl Namespace<'_> {
    pub fn get(&self, ino: Ino) -> Result<Inode> {
        self.store.faults.check(crate::faults::Step::ReadInode)?;
        must_inode(&self.store.conn(), ino)
    }

    /// An inode's kind and link count: what the open and close paths ask about an inode
    /// (is it still linked, may it be purged), without reading the whole row.
    pub fn links(&self, ino: Ino) -> Result<(Kind, u32)> {
        self.store.faults.check(crate::faults::Step::ReadInode)?;
        links_of(&self.store.conn(), ino)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Inode> {
        let conn = self.store.conn();
        // The name first: only directories have entries, so a hit needs no look at the
        // parent's row, and a miss only its kind (ENOTDIR, or ENOENT for a missing parent).
        if let Some(ino) = lookup_ino(&conn, parent, name)? {
            return must_inode(&conn, ino);
        }
        match links_of(&conn, parent)?.0 {
            Kind::Dir => Err(Error::NotFound),
            _ => Err(Error::NotDir),
        }
    }

    /// Creates a new inode named `name` in `parent`.
    pub fn create(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Inode> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let dir = must_dir(&tx, parent)?;
        if lookup_ino(&tx, parent, name)?.is_some() {
            return Err(Error::Exists);
        }
        let now = now_ns();
        let is_dir = node.kind == Kind::Dir;
        tx.prepare_cached(
            "INSERT INTO inodes (volume, kind, mode, uid, gid, atime, mtime, ctime, nlink, rdev,
                                 parent, target, size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            dir.volume,
            node.kind,
            node.mode as i64,
            node.uid as i64,
            node.gid as i64,
            now,
            if is_dir { 2 } else { 1 },
            node.rdev as i64,
            if is_dir { Some(parent as i64) } else { None },
            node.target.as_deref(),
            node.target.as_ref().map_or(0, |t| t.len() as i64),
        ])?;
        let ino = tx.last_insert_rowid() as u64;
        tx.prepare_cached("INSERT INTO dirents (parent, name, ino) VALUES (?1, ?2, ?3)")?
            .execute(params![parent as i64, name, ino as i64])?;
        if is_dir {
            tx.prepare_cached("UPDATE inodes SET nlink = nlink + 1 WHERE ino = ?1")?
                .execute([parent as i64])?;
        }
        touch_dir(&tx, parent, now)?;
        let inode = must_inode(&tx, ino)?;
        self.store.commit_tx(tx)?;
        Ok(inode)
    }

    /// Adds a hard link `newparent/newname` to `ino`.
    pub fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<Inode> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let node = must_inode(&tx, ino)?;
        if node.kind == Kind::Dir {
            return Err(Error::NotPermitted("hard links to directories"));
        }
        if node.nlink == 0 {
            return Err(Error::NotFound);
        }
        if node.nlink >= 65000 {
            return Err(Error::TooManyLinks);
        }
        let dir = must_dir(&tx, newparent)?;
        if dir.volume != node.volume {
            return Err(Error::Invalid("link across volumes"));
        }
        if lookup_ino(&tx, newparent, newname)?.is_some() {
            return Err(Error::Exists);
        }
        let now = now_ns();
        tx.prepare_cached("INSERT INTO dirents (parent, name, ino) VALUES (?1, ?2, ?3)")?
            .execute(params![newparent as i64, newname, ino as i64])?;
        tx.prepare_cached("UPDATE inodes SET nlink = nlink + 1, ctime = ?2 WHERE ino = ?1")?
            .execute(params![ino as i64, now])?;
        touch_dir(&tx, newparent, now)?;
        let inode = must_inode(&tx, ino)?;
        self.store.commit_tx(tx)?;
        Ok(inode)
    }

    /// Removes a non-directory name. Returns the inode number and its new link count.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<(Ino, u32)> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        must_inode(&tx, parent)?;
        let ino = lookup_ino(&tx, parent, name)?.ok_or(Error::NotFound)?;
        let node = must_inode(&tx, ino)?;
        if node.kind == Kind::Dir {
            return Err(Error::IsDir);
        }
        let now = now_ns();
        let nlink = drop_link(&tx, parent, name, ino, now)?;
        touch_dir(&tx, parent, now)?;
        self.store.commit_tx(tx)?;
        Ok((ino, nlink))
    }

    /// Removes an empty directory. Returns its inode number.
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let ino = lookup_ino(&tx, parent, name)?.ok_or(Error::NotFound)?;
        let node = must_inode(&tx, ino)?;
        if node.kind != Kind::Dir {
            return Err(Error::NotDir);
        }
        if !is_empty_dir(&tx, ino)? {
            return Err(Error::NotEmpty);
        }
        let now = now_ns();
        drop_link(&tx, parent, name, ino, now)?;
        touch_dir(&tx, parent, now)?;
        self.store.commit_tx(tx)?;
        Ok(ino)
    }

    /// Renames `parent/name` to `newparent/newname`. `noreplace` fails with EEXIST when the
    /// target exists; `exchange` swaps two existing names atomically.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> Result<Renamed> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let src_ino = lookup_ino(&tx, parent, name)?.ok_or(Error::NotFound)?;
        let src = must_inode(&tx, src_ino)?;
        let newdir = must_dir(&tx, newparent)?;
        if newdir.volume != src.volume {
            return Err(Error::Invalid("rename across volumes"));
        }
        let dst_ino = lookup_ino(&tx, newparent, newname)?;
        let now = now_ns();
        let mut out = Renamed::default();

        if exchange {
            let dst_ino = dst_ino.ok_or(Error::NotFound)?;
            let dst = must_inode(&tx, dst_ino)?;
            if src.kind == Kind::Dir && parent != newparent {
                check_no_cycle(&tx, src_ino, newparent)?;
            }
            if dst.kind == Kind::Dir && parent != newparent {
                check_no_cycle(&tx, dst_ino, parent)?;
            }
            tx.prepare_cached("UPDATE dirents SET ino = ?3 WHERE parent = ?1 AND name = ?2")?
                .execute(params![parent as i64, name, dst_ino as i64])?;
            tx.prepare_cached("UPDATE dirents SET ino = ?3 WHERE parent = ?1 AND name = ?2")?
                .execute(params![newparent as i64, newname, src_ino as i64])?;
            if parent != newparent {
                let dirs = (src.kind == Kind::Dir) as i64 - (dst.kind == Kind::Dir) as i64;
                if dirs != 0 {
                    tx.prepare_cached("UPDATE inodes SET nlink = nlink - ?2 WHERE ino = ?1")?
                        .execute(params![parent as i64, dirs])?;
                    tx.prepare_cached("UPDATE inodes SET nlink = nlink + ?2 WHERE ino = ?1")?
                        .execute(params![newparent as i64, dirs])?;
                }
                if src.kind == Kind::Dir {
                    tx.prepare_cached("UPDATE inodes SET parent = ?2 WHERE ino = ?1")?
                        .execute(params![src_ino as i64, newparent as i64])?;
                }
                if dst.kind == Kind::Dir {
                    tx.prepare_cached("UPDATE inodes SET parent = ?2 WHERE ino = ?1")?
                        .execute(params![dst_ino as i64, parent as i64])?;
                }
            }
            for i in [src_ino, dst_ino] {
                tx.prepare_cached("UPDATE inodes SET ctime = ?2 WHERE ino = ?1")?
                    .execute(params![i as i64, now])?;
            }
            touch_dir(&tx, parent, now)?;
            touch_dir(&tx, newparent, now)?;
            self.store.commit_tx(tx)?;
            return Ok(out);
        }

        if let Some(dst_ino) = dst_ino {
            if noreplace {
                return Err(Error::Exists);
            }
            if dst_ino == src_ino {
                // Two names of one inode: POSIX says do nothing.
                return Ok(out);
            }
            let dst = must_inode(&tx, dst_ino)?;
            match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                (true, false) => return Err(Error::NotDir),
                (false, true) => return Err(Error::IsDir),
                (true, true) if !is_empty_dir(&tx, dst_ino)? => return Err(Error::NotEmpty),
                _ => {}
            }
            if src.kind == Kind::Dir {
                check_no_cycle(&tx, src_ino, newparent)?;
            }
            let nlink = drop_link(&tx, newparent, newname, dst_ino, now)?;
            out.replaced = Some((dst_ino, nlink));
        } else if src.kind == Kind::Dir {
            check_no_cycle(&tx, src_ino, newparent)?;
        }

        // Delete and reinsert rather than update in place: the entry gets a new readdir cookie
        // at the end of its new directory, where a running listing will see it at most once.
        tx.prepare_cached("DELETE FROM dirents WHERE parent = ?1 AND name = ?2")?
            .execute(params![parent as i64, name])?;
        tx.prepare_cached("INSERT INTO dirents (parent, name, ino) VALUES (?1, ?2, ?3)")?
            .execute(params![newparent as i64, newname, src_ino as i64])?;
        if src.kind == Kind::Dir && parent != newparent {
            tx.prepare_cached("UPDATE inodes SET nlink = nlink - 1 WHERE ino = ?1")?
                .execute([parent as i64])?;
            tx.prepare_cached("UPDATE inodes SET nlink = nlink + 1 WHERE ino = ?1")?
                .execute([newparent as i64])?;
            tx.prepare_cached("UPDATE inodes SET parent = ?2 WHERE ino = ?1")?
                .execute(params![src_ino as i64, newparent as i64])?;
        }
        tx.prepare_cached("UPDATE inodes SET ctime = ?2 WHERE ino = ?1")?
            .execute(params![src_ino as i64, now])?;
        touch_dir(&tx, parent, now)?;
        if newparent != parent {
            touch_dir(&tx, newparent, now)?;
        }
        self.store.commit_tx(tx)?;
        Ok(out)
    }

    /// Applies attribute changes (not content: `size` here only records a new length; the
    /// filesystem layer owns the bytes). Returns the updated inode.
    pub fn setattr(&self, ino: Ino, a: &SetAttr) -> Result<Inode> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let mut n = must_inode(&tx, ino)?;
        if let Some(m) = a.mode {
            n.mode = m & 0o7777;
        }
        if let Some(u) = a.uid {
            n.uid = u;
        }
        if let Some(g) = a.gid {
            n.gid = g;
        }
        if let Some(s) = a.size {
            n.size = s;
        }
        if let Some(t) = a.atime {
            n.atime = t;
        }
        if let Some(t) = a.mtime {
            n.mtime = t;
        }
        n.ctime = a.ctime.unwrap_or_else(now_ns);
        tx.prepare_cached(
            "UPDATE inodes SET mode = ?2, uid = ?3, gid = ?4, size = ?5, atime = ?6, mtime = ?7,
             ctime = ?8 WHERE ino = ?1",
        )?
        .execute(params![
            ino as i64,
            n.mode as i64,
            n.uid as i64,
            n.gid as i64,
            n.size as i64,
            n.atime,
            n.mtime,
            n.ctime
        ])?;
        self.store.commit_tx(tx)?;
        Ok(n)
    }

    /// Points a file at no content (empty), dropping its blob reference.
    pub fn clear_content(&self, ino: Ino, mtime: i64) -> Result<Inode> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let n = must_inode(&tx, ino)?;
        let mut dead = Vec::new();
        if let Some(h) = n.blob {
            unref_blob(&tx, &h, &mut dead)?;
        }
        tx.prepare_cached(
            "UPDATE inodes SET blob = NULL, size = 0, mtime = ?2, ctime = ?2 WHERE ino = ?1",
        )?
        .execute(params![ino as i64, mtime])?;
        let n = must_inode(&tx, ino)?;
        self.store.commit_tx(tx)?;
        self.store.blobs().remove_dead_blobs(&conn, &dead);
        Ok(n)
    }

    /// Directory entries of `dir` with a cookie greater than `after`, at most `limit`.
    /// Each item: (cookie, name, inode).
    pub fn readdir(
        &self,
        dir: Ino,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Vec<u8>, Inode)>> {
        let conn = self.store.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT d.id, d.name, {INODE_COLS} FROM dirents d JOIN inodes i ON i.ino = d.ino
             WHERE d.parent = ?1 AND d.id > ?2 ORDER BY d.id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![dir as i64, after, limit as i64], |r| {
            let cookie: i64 = r.get(0)?;
            let name: Vec<u8> = r.get(1)?;
            let inode = row_to_inode_at(r, 2)?;
            Ok((cookie, name, inode))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes an inode whose last name is gone (nlink 0) and drops its blob reference.
    /// Called once nothing (kernel lookups, open handles) holds it any more.
    pub fn purge(&self, ino: Ino) -> Result<()> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let Some(n) = get_inode(&tx, ino)? else {
            return Ok(());
        };
        if n.nlink != 0 {
            return Ok(());
        }
        let mut dead = Vec::new();
        if let Some(h) = n.blob {
            unref_blob(&tx, &h, &mut dead)?;
        }
        tx.prepare_cached("DELETE FROM xattrs WHERE ino = ?1")?
            .execute([ino as i64])?;
        tx.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?
            .execute([ino as i64])?;
        self.store.commit_tx(tx)?;
        self.store.blobs().remove_dead_blobs(&conn, &dead);
        Ok(())
    }

    /// Purges every unlinked inode; at open, nothing can hold one any more.
    pub(crate) fn purge_unlinked(&self) -> Result<usize> {
        let inos: Vec<u64> = {
            let conn = self.store.conn();
            let mut stmt = conn.prepare("SELECT ino FROM inodes WHERE nlink = 0")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|i| i as u64))
                .collect::<rusqlite::Result<_>>()?
        };
        for &ino in &inos {
            self.purge(ino)?;
        }
        Ok(inos.len())
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let conn = self.store.conn();
        let v = conn
            .prepare_cached("SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2")?
            .query_row(params![ino as i64, name], |r| r.get(0))
            .optional()?;
        match v {
            Some(v) => Ok(v),
            // No such attribute, or no such inode: which one, the cheap way.
            None => links_of(&conn, ino).and(Err(Error::NoAttr)),
        }
    }

    /// Sets an xattr. `create`: fail if it exists; `replace`: fail if it does not.
    pub fn setxattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> Result<()> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        must_inode(&tx, ino)?;
        let exists = tx
            .prepare_cached("SELECT 1 FROM xattrs WHERE ino = ?1 AND name = ?2")?
            .query_row(params![ino as i64, name], |_| Ok(()))
            .optional()?
            .is_some();
        if create && exists {
            return Err(Error::Exists);
        }
        if replace && !exists {
            return Err(Error::NoAttr);
        }
        tx.prepare_cached("INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)")?
            .execute(params![ino as i64, name, value])?;
        tx.prepare_cached("UPDATE inodes SET ctime = ?2 WHERE ino = ?1")?
            .execute(params![ino as i64, now_ns()])?;
        self.store.commit_tx(tx)?;
        Ok(())
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let conn = self.store.conn();
        must_inode(&conn, ino)?;
        let mut stmt =
            conn.prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?;
        let rows = stmt.query_map([ino as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        let conn = self.store.conn();
        must_inode(&conn, ino)?;
        let n = conn
            .prepare_cached("DELETE FROM xattrs WHERE ino = ?1 AND name = ?2")?
            .execute(params![ino as i64, name])?;
        if n == 0 {
            return Err(Error::NoAttr);
        }
        conn.prepare_cached("UPDATE inodes SET ctime = ?2 WHERE ino = ?1")?
            .execute(params![ino as i64, now_ns()])?;
        Ok(())
    }

    /// Volume id of an inode's tree, for cross-volume checks.
    pub fn volume_of(&self, ino: Ino) -> Result<i64> {
        Ok(must_inode(&self.store.conn(), ino)?.volume)
    }
}

/// Refuses to move directory `dir` under itself: walks up from `newparent` to the root.
fn check_no_cycle(conn: &Connection, dir: Ino, newparent: Ino) -> Result<()> {
    let mut cur = Some(newparent);
    let mut steps = 0;
    while let Some(c) = cur {
        if c == dir {
            return Err(Error::Invalid("cannot move a directory into itself"));
        }
        steps += 1;
        if steps > 100_000 {
            return Err(Error::Invalid("directory tree too deep"));
        }
        cur = get_inode(conn, c)?.and_then(|n| n.parent);
    }
    Ok(())
}
