//! Background push and follow (mount options `push=`, `follow=`), the store's part: the
//! upload queue, which is simply every local blob a volume uses that no upstream holds yet
//! (`blobs.remote = 0`), so it survives restarts and outages with nothing extra to keep
//! consistent; uploading from it; and the record of what each push or follow last did
//! (`sync_state`, migration 7), read by `kcache stats` whether the daemon answers or not.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::outboard;
use crate::remote::{blob_key, Upstream};
use crate::{now_ns, Hash, Store};

/// Which way a sync goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// Local content and snapshots go to the upstream (`push=`).
    Push,
    /// The upstream's snapshot is merged into the volume (`follow=`).
    Follow,
}

impl SyncKind {
    fn as_str(self) -> &'static str {
        match self {
            SyncKind::Push => "push",
            SyncKind::Follow => "follow",
        }
    }
}

impl ToSql for SyncKind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for SyncKind {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<SyncKind> {
        match v.as_str()? {
            "push" => Ok(SyncKind::Push),
            "follow" => Ok(SyncKind::Follow),
            other => Err(FromSqlError::Other(
                format!("sync_state.kind is {other:?} (expected push or follow)").into(),
            )),
        }
    }
}

/// One push or follow, as `kcache stats` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub kind: SyncKind,
    pub url: String,
    pub tag: String,
    pub volume: String,
    /// When the last run succeeded (ns since the epoch): a publish for a push, a merge for a
    /// follow.
    pub last_ok_ns: Option<i64>,
    pub last_attempt_ns: Option<i64>,
    /// What the last failed run said; cleared by the next success.
    pub last_error: Option<String>,
    pub runs: u64,
    pub errors: u64,
    /// Blobs and bytes uploaded (push) or names added and updated (follow, in `blobs_moved`).
    pub blobs_moved: u64,
    pub bytes_moved: u64,
    /// Push only: local blobs of the volume no upstream holds yet (the upload queue).
    pub queued_blobs: u64,
    pub queued_bytes: u64,
}

/// What one run did, for `Store::sync_record`.
pub enum SyncOutcome {
    /// It succeeded (`publish`: a snapshot was published or merged, not only uploads).
    Done {
        blobs: u64,
        bytes: u64,
        publish: bool,
    },
    Failed(String),
}

impl Store {
    /// Up to `limit` local blobs that volume `volume` uses and no upstream holds: what a
    /// background push still has to upload.
    pub fn unpushed_blobs(&self, volume: &str, limit: u64) -> Result<Vec<(Hash, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT b.hash, b.size FROM blobs b
             JOIN inodes i ON i.blob = b.hash
             JOIN volumes v ON v.id = i.volume
             WHERE v.name = ?1 AND i.nlink > 0 AND b.remote = 0 AND b.state = ?2
             LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![volume, crate::lifecycle::LOCAL, limit as i64],
            |r| {
                Ok((
                    r.get::<_, Hash>(0)?,
                    crate::codec::unsigned(r.get(1)?, "blobs.size")?,
                ))
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (blobs, bytes) still to upload for volume `volume`.
    fn queue_of(&self, volume: &str) -> Result<(u64, u64)> {
        let conn = self.conn();
        let (n, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0) FROM (
                 SELECT DISTINCT b.hash, b.size FROM blobs b
                 JOIN inodes i ON i.blob = b.hash
                 JOIN volumes v ON v.id = i.volume
                 WHERE v.name = ?1 AND i.nlink > 0 AND b.remote = 0 AND b.state = ?2)",
            params![volume, crate::lifecycle::LOCAL],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n.max(0) as u64, bytes.max(0) as u64))
    }

    /// Uploads `blobs` to `up` (those it lacks, by one listing) and marks each as held by an
    /// upstream once it is there. Returns (blobs, bytes) uploaded. Stops at the first error,
    /// keeping what was marked: the rest stays queued.
    pub fn upload_queued(&self, up: &Upstream, blobs: &[(Hash, u64)]) -> Result<(u64, u64)> {
        if blobs.is_empty() {
            return Ok((0, 0));
        }
        let have_blobs = Store::list_objects(up, "blobs/")?;
        let have_outboards = Store::list_objects(up, "outboards/")?;
        let (mut n, mut bytes) = (0, 0);
        for (h, size) in blobs {
            let blob = !have_blobs.contains(&blob_key(h));
            let ob =
                outboard::needed(*size) && !have_outboards.contains(&crate::fetch::outboard_key(h));
            match self.upload_blob(up, h, *size, blob, ob) {
                Ok(()) => {}
                // Evicted or deleted meanwhile: nothing to upload, and nothing queued now.
                Err(crate::Error::NotFound) => continue,
                Err(e) => return Err(e),
            }
            self.mark_remote(std::slice::from_ref(h))?;
            if blob {
                n += 1;
                bytes += size;
            }
        }
        Ok((n, bytes))
    }

    /// Records what a push or follow run did.
    pub fn sync_record(
        &self,
        kind: SyncKind,
        url: &str,
        tag: &str,
        volume: &str,
        outcome: &SyncOutcome,
    ) -> Result<()> {
        let now = now_ns();
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        tx.execute(
            "INSERT INTO sync_state (kind, url, tag, volume) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO NOTHING",
            params![kind, url, tag, volume],
        )?;
        let key = params![kind, url, tag, volume];
        match outcome {
            SyncOutcome::Done {
                blobs,
                bytes,
                publish,
            } => {
                tx.execute(
                    "UPDATE sync_state SET last_attempt = ?5, runs = runs + 1,
                         blobs_moved = blobs_moved + ?6, bytes_moved = bytes_moved + ?7,
                         last_ok = CASE WHEN ?8 THEN ?5 ELSE last_ok END,
                         last_error = CASE WHEN ?8 THEN NULL ELSE last_error END
                     WHERE kind = ?1 AND url = ?2 AND tag = ?3 AND volume = ?4",
                    params![
                        key[0],
                        key[1],
                        key[2],
                        key[3],
                        now,
                        *blobs as i64,
                        *bytes as i64,
                        publish
                    ],
                )?;
            }
            SyncOutcome::Failed(e) => {
                tx.execute(
                    "UPDATE sync_state SET last_attempt = ?5, runs = runs + 1,
                         errors = errors + 1, last_error = ?6
                     WHERE kind = ?1 AND url = ?2 AND tag = ?3 AND volume = ?4",
                    params![key[0], key[1], key[2], key[3], now, e],
                )?;
            }
        }
        self.commit_tx(tx)
    }

    /// Every push and follow this store has run, with each push's queue now.
    pub fn sync_statuses(&self) -> Result<Vec<SyncStatus>> {
        let rows: Vec<SyncStatus> = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(
                "SELECT kind, url, tag, volume, last_ok, last_attempt, last_error, runs, errors,
                        blobs_moved, bytes_moved
                 FROM sync_state ORDER BY kind, volume, url, tag",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SyncStatus {
                    kind: r.get(0)?,
                    url: r.get(1)?,
                    tag: r.get(2)?,
                    volume: r.get(3)?,
                    last_ok_ns: r.get(4)?,
                    last_attempt_ns: r.get(5)?,
                    last_error: r.get(6)?,
                    runs: crate::codec::unsigned(r.get(7)?, "sync_state.runs")?,
                    errors: crate::codec::unsigned(r.get(8)?, "sync_state.errors")?,
                    blobs_moved: crate::codec::unsigned(r.get(9)?, "sync_state.blobs_moved")?,
                    bytes_moved: crate::codec::unsigned(r.get(10)?, "sync_state.bytes_moved")?,
                    queued_blobs: 0,
                    queued_bytes: 0,
                })
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::with_capacity(rows.len());
        for mut s in rows {
            if s.kind == SyncKind::Push {
                (s.queued_blobs, s.queued_bytes) = self.queue_of(&s.volume)?;
            }
            out.push(s);
        }
        Ok(out)
    }

    /// Whether volume `volume` exists (a follow may start before its first merge made it).
    pub fn has_volume(&self, volume: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM volumes WHERE name = ?1",
                [volume],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_the_database_and_unknown_ones_are_errors() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for k in [SyncKind::Push, SyncKind::Follow] {
            let back: SyncKind = c.query_row("SELECT ?1", [k], |r| r.get(0)).unwrap();
            assert_eq!(back, k);
        }
        let bad: rusqlite::Result<SyncKind> = c.query_row("SELECT 'mirror'", [], |r| r.get(0));
        assert!(bad.unwrap_err().to_string().contains("mirror"));
    }
}
