//! Least-recently-used bookkeeping and eviction. Accesses are noted in memory and written in
//! batches (never one database write per open); eviction removes whole files, never parts.

use std::sync::atomic::Ordering;

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::faults::Step;
use crate::lifecycle::BlobState;
use crate::{now_ns, Hash, Ino, Store};

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

/// Which blobs an eviction removes, least recently used first. With both limits set it stops
/// at whichever is reached first.
#[derive(Debug, Default, Clone, Copy)]
pub struct EvictPolicy {
    /// Stop once at most this many bytes of local blobs are stored.
    pub target: Option<u64>,
    /// Only blobs last used before this time (nanoseconds since the epoch).
    pub used_before: Option<i64>,
}

impl Store {
    /// The next access time. Recency is a clock in nanoseconds since the epoch that never goes
    /// back and never repeats, so `kcache clean --older-than` can use it as a time while a
    /// clock step cannot reorder the LRU.
    pub(crate) fn next_access_seq(&self) -> i64 {
        let now = now_ns().max(0) as u64;
        let next = |p: u64| p.saturating_add(1).max(now);
        let prev = self
            .access_seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(next(p)))
            .unwrap_or_else(|p| p);
        next(prev) as i64
    }

    /// Bytes of local blobs (kept by triggers in the database: one row, no scan).
    pub fn stored_bytes(&self) -> Result<u64> {
        let v: Option<i64> = self
            .conn()
            .query_row(
                "SELECT value FROM counters WHERE name = 'stored_bytes'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// Least-recently-used order and eviction.
    pub fn lru(&self) -> Lru<'_> {
        Lru { store: self }
    }
}

/// The store's LRU order and eviction: accesses noted in memory and written in batches, and
/// eviction of whole files, least recently used first. A view over the store (which owns the
/// connection); `Store::lru` gives one.
#[derive(Clone, Copy)]
pub struct Lru<'s> {
    store: &'s Store,
}

impl Lru<'_> {
    /// Notes that a blob was used. Cheap: memory only, written by `flush_accesses` (called
    /// here once `ACCESS_BATCH` accesses are pending, and by the daemon once a second).
    pub fn note_access(&self, hash: Hash) {
        let seq = self.store.next_access_seq();
        let full = {
            let mut pending = self
                .store
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

    /// Writes pending accesses and statistics counters in one transaction.
    pub fn flush_accesses(&self) -> Result<usize> {
        let pending = std::mem::take(
            &mut *self
                .store
                .pending_access
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let counts = self.store.take_pending_counters();
        // A halted store takes no writes: these are recency hints and statistics, dropped
        // rather than piled up in memory or reported as a failure every second.
        if (pending.is_empty() && counts.iter().all(|(_, n)| *n == 0))
            || self.store.halted().is_some()
        {
            return Ok(0);
        }
        let conn = self.store.conn();
        let res = (|| -> Result<()> {
            let tx = self.store.begin_tx(&conn)?;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE blobs SET last_access = max(last_access, ?2) WHERE hash = ?1",
                )?;
                for (h, seq) in &pending {
                    stmt.execute(params![&h.0[..], seq])?;
                }
            }
            for (name, n) in &counts {
                crate::maint::add_counter(&tx, name, *n)?;
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = res {
            // Keep the counts for the next try; accesses are only recency hints.
            drop(conn);
            for (name, n) in counts {
                self.store.restore_pending_counter(name, n);
            }
            return Err(e);
        }
        Ok(pending.len())
    }

    /// Up to `limit` local blobs with their last access, least recently used first, after
    /// the position `after` in that order.
    fn lru_candidates(&self, limit: usize, after: &(i64, Vec<u8>)) -> Result<Vec<(Hash, i64)>> {
        let conn = self.store.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT hash, last_access FROM blobs
             WHERE state = ?4 AND (last_access > ?1 OR (last_access = ?1 AND hash > ?2))
             ORDER BY last_access, hash LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![after.0, &after.1, limit as i64, crate::lifecycle::LOCAL],
            |r| Ok((r.get::<_, Hash>(0)?, r.get::<_, i64>(1)?)),
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Evicts least-recently-used blobs, with every name that refers to them, until at most
    /// `target` bytes are stored. See `evict`.
    pub fn evict_to<G>(&self, target: u64, claim: impl Fn(&Hash) -> Option<G>) -> Result<Evicted> {
        self.evict(
            EvictPolicy {
                target: Some(target),
                used_before: None,
            },
            claim,
        )
    }

    /// Evicts least-recently-used blobs, with every name that refers to them, as `policy`
    /// says. Pinned blobs are never evicted. `claim` decides per blob: `None` skips it (in
    /// use), `Some` returns a guard that is held while the blob is evicted, so the caller can
    /// keep a blob from becoming in use between its check and the eviction.
    pub fn evict<G>(
        &self,
        policy: EvictPolicy,
        claim: impl Fn(&Hash) -> Option<G>,
    ) -> Result<Evicted> {
        self.flush_accesses()?;
        let mut out = Evicted::default();
        let (pinned, _) = self.store.pinned_blobs()?;
        // A cursor through the LRU order: skipped (pinned, open) blobs are never read twice.
        let mut cursor: (i64, Vec<u8>) = (i64::MIN, Vec::new());
        'outer: loop {
            // Usage is reread per batch, so concurrent commits count too.
            let mut used = self.store.stored_bytes()?;
            let batch = self.lru_candidates(64, &cursor)?;
            if batch.is_empty() {
                break;
            }
            for (h, last) in batch {
                if policy.target.is_some_and(|t| used <= t) {
                    break 'outer;
                }
                if policy.used_before.is_some_and(|t| last >= t) {
                    break 'outer;
                }
                cursor = (last, h.0.to_vec());
                if pinned.contains(&h) {
                    continue;
                }
                if let Some(_guard) = claim(&h) {
                    used = used.saturating_sub(self.evict_blob(&h, last, &mut out)?);
                }
            }
        }
        Ok(out)
    }

    /// Removes one blob and every inode (all their names) that holds it, in one transaction.
    /// Returns the bytes freed.
    /// `last` is the access time the candidate was chosen with: a blob used since (a commit
    /// that just deduplicated onto it, say) is not evicted.
    fn evict_blob(&self, h: &Hash, last: i64, out: &mut Evicted) -> Result<u64> {
        let conn = self.store.conn();
        let tx = self.store.begin_tx(&conn)?;
        let Some((size, state)) = tx
            .query_row(
                "SELECT size, state, remote FROM blobs WHERE hash = ?1 AND last_access = ?2",
                params![h, last],
                |r| Ok((r.get::<_, i64>(0)?, BlobState::from_row(r, 1)?)),
            )
            .optional()?
        else {
            return Ok(0);
        };
        let BlobState::Local { upstream } = state else {
            return Ok(0);
        };
        if upstream {
            // An upstream has it: drop only the local bytes. Every name stays, and the next
            // open fetches the content again.
            crate::lifecycle::drop_local(&tx, h)?;
            crate::maint::add_counter(&tx, "evictions", 1)?;
            crate::maint::add_counter(&tx, "evicted_bytes", size as u64)?;
            self.store.commit_tx(tx)?;
            // Committed (out of any group) before the file goes: see `remove_dead_blobs`.
            self.store.settle_group(&conn)?;
            // A file left by a failed unlink is replaced by the next download's install.
            if self.store.faults.check(Step::Unlink).is_ok() {
                let _ = std::fs::remove_file(self.store.blobs().blob_path(h));
            }
            out.blobs += 1;
            out.bytes += size as u64;
            return Ok(size as u64);
        }
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
                tx.prepare_cached("UPDATE inodes SET mtime = ?2, ctime = ?2 WHERE ino = ?1")?
                    .execute(params![parent, now])?;
                out.names.push((parent as Ino, name, ino as Ino));
            }
            tx.prepare_cached("DELETE FROM dirents WHERE ino = ?1")?
                .execute([ino])?;
            tx.prepare_cached("DELETE FROM xattrs WHERE ino = ?1")?
                .execute([ino])?;
            tx.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?
                .execute([ino])?;
        }
        tx.prepare_cached("DELETE FROM blobs WHERE hash = ?1")?
            .execute([&h.0[..]])?;
        tx.prepare_cached("INSERT OR IGNORE INTO dead_blobs (hash) VALUES (?1)")?
            .execute([&h.0[..]])?;
        crate::maint::add_counter(&tx, "evictions", 1)?;
        crate::maint::add_counter(&tx, "evicted_bytes", size as u64)?;
        self.store.commit_tx(tx)?;
        self.store.blobs().remove_dead_blobs(&conn, &[*h]);
        out.blobs += 1;
        out.bytes += size as u64;
        Ok(size as u64)
    }
}
