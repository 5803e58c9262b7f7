//! Least-recently-used bookkeeping and eviction. Accesses are noted in memory and written in
//! batches (never one database write per open); eviction removes whole files, never parts.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::{Hash, Ino, Store};

/// Accesses noted since the last flush are written once this many have piled up.
pub const ACCESS_BATCH: usize = 1000;

/// What an eviction removed.
#[derive(Debug, Default, Clone)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
    /// Every name that went away, as (parent, name, inode), for kernel cache invalidation.
    pub names: Vec<(Ino, Vec<u8>, Ino)>,
}

impl Store {
    /// The next access sequence number. Recency is an ever-growing sequence, not wall-clock
    /// time, so clock changes cannot reorder the LRU.
    pub(crate) fn next_access_seq(&self) -> i64 {
        self.access_seq.fetch_add(1, Ordering::Relaxed) as i64 + 1
    }

    /// Notes that a blob was used. Cheap: memory only, written by `flush_accesses` (called
    /// here once `ACCESS_BATCH` accesses are pending, and by the daemon once a second).
    pub fn note_access(&self, hash: Hash) {
        let seq = self.next_access_seq();
        let full = {
            let mut pending = self
                .pending_access
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending.push((hash, seq));
            pending.len() >= ACCESS_BATCH
        };
        if full {
            if let Err(e) = self.flush_accesses() {
                tracing::warn!(error = %e, "recording accesses failed");
            }
        }
    }

    /// Writes pending accesses in one transaction.
    pub fn flush_accesses(&self) -> Result<usize> {
        let pending = std::mem::take(
            &mut *self
                .pending_access
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if pending.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE blobs SET last_access = max(last_access, ?2) WHERE hash = ?1",
            )?;
            for (h, seq) in &pending {
                stmt.execute(params![&h.0[..], seq])?;
            }
        }
        tx.commit()?;
        Ok(pending.len())
    }

    /// Bytes of local blobs.
    pub fn stored_bytes(&self) -> Result<u64> {
        Ok(self.conn().query_row(
            "SELECT coalesce(sum(size), 0) FROM blobs WHERE state = 0",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Up to `limit` local blobs, least recently used first, skipping those in `skip`.
    fn lru_candidates(&self, limit: usize, skip: &HashSet<Hash>) -> Result<Vec<Hash>> {
        self.flush_accesses()?;
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT hash FROM blobs WHERE state = 0 ORDER BY last_access, hash LIMIT ?1",
        )?;
        let rows = stmt.query_map([(skip.len() + limit) as i64], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows
            .filter_map(|r| r.ok().and_then(crate::ns::hash_from_db))
            .filter(|h| !skip.contains(h))
            .take(limit)
            .collect())
    }

    /// Evicts least-recently-used blobs, with every name that refers to them, until at most
    /// `target` bytes are stored. `claim` decides per blob: `None` skips it (in use), `Some`
    /// returns a guard that is held while the blob is evicted, so the caller can keep a blob
    /// from becoming in use between its check and the eviction.
    pub fn evict_to<G>(&self, target: u64, claim: impl Fn(&Hash) -> Option<G>) -> Result<Evicted> {
        let mut out = Evicted::default();
        let mut skipped: HashSet<Hash> = HashSet::new();
        let start = self.stored_bytes()?;
        while start.saturating_sub(out.bytes) > target {
            let candidates = self.lru_candidates(64, &skipped)?;
            if candidates.is_empty() {
                break;
            }
            for h in candidates {
                if start.saturating_sub(out.bytes) <= target {
                    break;
                }
                match claim(&h) {
                    Some(_guard) => self.evict_blob(&h, &mut out)?,
                    None => {
                        skipped.insert(h);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Removes one blob and every inode (all their names) that holds it, in one transaction.
    fn evict_blob(&self, h: &Hash, out: &mut Evicted) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(size) = tx
            .query_row("SELECT size FROM blobs WHERE hash = ?1", [&h.0[..]], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
        else {
            return Ok(());
        };
        let inos: Vec<i64> = {
            let mut stmt = tx.prepare_cached("SELECT ino FROM inodes WHERE blob = ?1")?;
            let rows = stmt.query_map([&h.0[..]], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = crate::now_ns();
        for ino in inos {
            let names: Vec<(i64, Vec<u8>)> = {
                let mut stmt =
                    tx.prepare_cached("SELECT parent, name FROM dirents WHERE ino = ?1")?;
                let rows = stmt.query_map([ino], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (parent, name) in names {
                tx.execute(
                    "UPDATE inodes SET mtime = ?2, ctime = ?2 WHERE ino = ?1",
                    params![parent, now],
                )?;
                out.names.push((parent as Ino, name, ino as Ino));
            }
            tx.execute("DELETE FROM dirents WHERE ino = ?1", [ino])?;
            tx.execute("DELETE FROM xattrs WHERE ino = ?1", [ino])?;
            tx.execute("DELETE FROM inodes WHERE ino = ?1", [ino])?;
        }
        tx.execute("DELETE FROM blobs WHERE hash = ?1", [&h.0[..]])?;
        tx.execute(
            "INSERT OR IGNORE INTO dead_blobs (hash) VALUES (?1)",
            [&h.0[..]],
        )?;
        tx.commit()?;
        self.remove_dead_blobs(&conn, &[*h]);
        out.blobs += 1;
        out.bytes += size as u64;
        Ok(())
    }
}
