//! Volume lifecycle beyond creation: removing a volume and cloning one. A clone copies the
//! namespace rows only and takes one more reference on each blob, so it costs metadata, not
//! data, and the two volumes are independent afterwards (content is copy-on-write by nature:
//! a write makes a new blob).

use rusqlite::params;

use crate::error::{Error, Result};
use crate::{now_ns, Store, VolumeInfo};

/// Inserts the row of a new volume (its root is set by the caller once it exists) and returns
/// its id with the first free inode number: new inodes are numbered above every number ever
/// used (AUTOINCREMENT never reuses them). Callers finish with `bump_inode_sequence`.
pub(crate) fn new_volume_row(tx: &rusqlite::Connection, name: &str) -> Result<(i64, i64)> {
    tx.execute(
        "INSERT INTO volumes (name, root, created) VALUES (?1, 0, ?2)",
        params![name, now_ns()],
    )?;
    let id = tx.last_insert_rowid();
    let base: i64 = tx.query_row(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'inodes'), 0),
                    (SELECT coalesce(max(ino), 0) FROM inodes))",
        [],
        |r| r.get(0),
    )?;
    Ok((id, base + 1))
}

/// Records explicitly numbered inodes in AUTOINCREMENT's counter.
pub(crate) fn bump_inode_sequence(tx: &rusqlite::Connection) -> Result<()> {
    tx.execute(
        "UPDATE sqlite_sequence SET seq = (SELECT max(ino) FROM inodes) WHERE name = 'inodes'",
        [],
    )?;
    Ok(())
}

/// Deletes the rows of volume `id` (its inodes, names and xattrs, one reference per inode);
/// returns its file count and the blobs left without references, whose rows are deleted and
/// queued in `dead_blobs` (their files go once the transaction commits).
pub(crate) fn delete_volume_rows(
    tx: &rusqlite::Connection,
    id: i64,
) -> Result<(u64, Vec<crate::Hash>)> {
    let files: i64 = tx.query_row(
        "SELECT count(*) FROM inodes WHERE volume = ?1 AND kind = 1",
        [id],
        |r| r.get(0),
    )?;
    tx.execute(
        "DELETE FROM xattrs WHERE ino IN (SELECT ino FROM inodes WHERE volume = ?1)",
        [id],
    )?;
    tx.execute(
        "DELETE FROM dirents WHERE ino IN (SELECT ino FROM inodes WHERE volume = ?1)",
        [id],
    )?;
    // One reference per inode goes; blobs left without any are deleted with their files.
    tx.execute(
        "UPDATE blobs SET refs = refs - (SELECT count(*) FROM inodes i
             WHERE i.volume = ?1 AND i.blob = blobs.hash)
         WHERE hash IN (SELECT blob FROM inodes WHERE volume = ?1 AND blob IS NOT NULL)",
        [id],
    )?;
    let dead: Vec<crate::Hash> = {
        let mut stmt = tx.prepare("SELECT hash FROM blobs WHERE refs <= 0")?;
        let rows = stmt.query_map([], |r| r.get::<_, crate::Hash>(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for h in &dead {
        tx.execute("DELETE FROM blobs WHERE hash = ?1", [h])?;
        tx.execute("INSERT OR IGNORE INTO dead_blobs (hash) VALUES (?1)", [h])?;
    }
    tx.execute("DELETE FROM inodes WHERE volume = ?1", [id])?;
    tx.execute("DELETE FROM volumes WHERE id = ?1", [id])?;
    Ok((files as u64, dead))
}

impl Store {
    /// Deletes volume `name` with everything in it; blobs nothing else uses are freed.
    pub fn remove_volume(&self, name: &str) -> Result<u64> {
        let v = self.volume(name, false, 0, 0)?;
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        let (files, dead) = delete_volume_rows(&tx, v.id)?;
        self.commit_tx(tx)?;
        self.blobs().remove_dead_blobs(&conn, &dead);
        Ok(files)
    }

    /// Makes volume `dst` a copy of `src` in one transaction: the same tree, modes, times,
    /// xattrs, symlinks and hard links, sharing every blob.
    pub fn clone_volume(&self, src: &str, dst: &str) -> Result<VolumeInfo> {
        let s = self.volume(src, false, 0, 0)?;
        if self.volume(dst, false, 0, 0).is_ok() {
            return Err(Error::Exists);
        }
        if dst.is_empty() || dst.len() > 128 || dst.contains('/') {
            return Err(Error::Invalid("volume names are 1-128 bytes without '/'"));
        }
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        let (id, first) = new_volume_row(&tx, dst)?;
        tx.execute_batch(
            "DROP TABLE IF EXISTS temp.clone_map;
             CREATE TEMP TABLE clone_map (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);",
        )?;
        // Only inodes with names: an unlinked file still open in the source is not copied.
        tx.execute(
            "INSERT INTO temp.clone_map (old, new)
             SELECT ino, ?2 - 1 + row_number() OVER (ORDER BY ino) FROM inodes
             WHERE volume = ?1 AND nlink > 0",
            params![s.id, first],
        )?;
        tx.execute(
            "INSERT INTO inodes (ino, volume, kind, mode, uid, gid, size, atime, mtime, ctime,
                                 nlink, rdev, parent, blob, target)
             SELECT m.new, ?1, i.kind, i.mode, i.uid, i.gid, i.size, i.atime, i.mtime, i.ctime,
                    i.nlink, i.rdev, (SELECT p.new FROM temp.clone_map p WHERE p.old = i.parent),
                    i.blob, i.target
             FROM inodes i JOIN temp.clone_map m ON m.old = i.ino",
            [id],
        )?;
        tx.execute(
            "INSERT INTO dirents (parent, name, ino)
             SELECT p.new, d.name, c.new FROM dirents d
             JOIN temp.clone_map p ON p.old = d.parent
             JOIN temp.clone_map c ON c.old = d.ino
             ORDER BY d.id",
            [],
        )?;
        tx.execute(
            "INSERT INTO xattrs (ino, name, value)
             SELECT m.new, x.name, x.value FROM xattrs x JOIN temp.clone_map m ON m.old = x.ino",
            [],
        )?;
        tx.execute(
            "UPDATE blobs SET refs = refs + (SELECT count(*) FROM inodes i
                 WHERE i.volume = ?1 AND i.blob = blobs.hash)
             WHERE hash IN (SELECT blob FROM inodes WHERE volume = ?1 AND blob IS NOT NULL)",
            [id],
        )?;
        let root: i64 = tx.query_row(
            "SELECT new FROM temp.clone_map WHERE old = ?1",
            [s.root as i64],
            |r| r.get(0),
        )?;
        tx.execute(
            "UPDATE volumes SET root = ?2 WHERE id = ?1",
            params![id, root],
        )?;
        bump_inode_sequence(&tx)?;
        tx.execute_batch("DROP TABLE temp.clone_map;")?;
        self.commit_tx(tx)?;
        Ok(VolumeInfo {
            id,
            name: dst.to_owned(),
            root: root as u64,
        })
    }
}

/// One line of `kcache volume list`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeSummary {
    pub name: String,
    pub files: u64,
    pub logical_bytes: u64,
    /// Creation time, nanoseconds since the epoch.
    pub created: i64,
}

impl Store {
    pub fn volume_summaries(&self) -> Result<Vec<VolumeSummary>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT v.name, v.created,
                    (SELECT count(*) FROM inodes i WHERE i.volume = v.id AND i.kind = 1 AND i.nlink > 0),
                    (SELECT coalesce(sum(size), 0) FROM inodes i
                     WHERE i.volume = v.id AND i.kind = 1 AND i.nlink > 0)
             FROM volumes v ORDER BY v.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(VolumeSummary {
                name: r.get(0)?,
                created: r.get(1)?,
                files: r.get::<_, i64>(2)? as u64,
                logical_bytes: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
