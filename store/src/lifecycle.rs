//! The blob lifecycle: where a blob's bytes are, as one type converted strictly from and to
//! the `blobs.state` and `blobs.remote` columns, and every transition between its states.
//! No other module writes those two columns; queries elsewhere that select by state bind the
//! codes defined here. Schema 6 adds a `CHECK` that rejects any other combination.
//!
//! ```text
//!             commit (a writer's content)               pull (a manifest names it)
//!   (none) ───────────────────────────► Local ◄──┐   (none) ──────────────► RemoteOnly
//!                                         │      │ commit / fetched             │   ▲
//!                       push: upstream=1  │      └──────────────────────────────┘   │
//!                                         ▼                                         │
//!                              Local{upstream} ── evict (drop the local bytes) ─────┘
//!   verify (bad or missing file): Local{..} → Quarantined{..}; a commit of the right
//!   bytes makes it Local again. The last reference gone: the row is deleted (dead_blobs).
//! ```

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::error::Result;
use crate::Hash;

/// `blobs.state` codes. Only this module writes them; queries bind them as parameters.
pub(crate) const LOCAL: i64 = 0;
pub(crate) const REMOTE_ONLY: i64 = 1;
pub(crate) const QUARANTINED: i64 = 2;

/// Where a blob's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// A verified file under `blobs/`; `upstream`: an upstream holds a copy too, so eviction
    /// may drop only the local bytes and keep every name.
    Local { upstream: bool },
    /// Only an upstream has the bytes; the first open fetches them.
    RemoteOnly,
    /// Failed verification or went missing; opens fail with EIO until the right bytes are
    /// committed again.
    Quarantined { upstream: bool },
}

impl BlobState {
    pub fn is_local(self) -> bool {
        matches!(self, BlobState::Local { .. })
    }

    /// An upstream is known to hold the blob.
    pub fn has_upstream_copy(self) -> bool {
        match self {
            BlobState::Local { upstream } | BlobState::Quarantined { upstream } => upstream,
            BlobState::RemoteOnly => true,
        }
    }

    /// The `(state, remote)` columns (the transitions below write them; tests check the
    /// mapping both ways).
    #[cfg(test)]
    pub(crate) fn to_columns(self) -> (i64, i64) {
        match self {
            BlobState::Local { upstream } => (LOCAL, upstream as i64),
            BlobState::RemoteOnly => (REMOTE_ONLY, 1),
            BlobState::Quarantined { upstream } => (QUARANTINED, upstream as i64),
        }
    }

    /// Strict: any combination the store never writes is an error naming it.
    pub(crate) fn from_columns(state: i64, remote: i64) -> std::result::Result<BlobState, String> {
        let upstream = match remote {
            0 => false,
            1 => true,
            _ => return Err(format!("blobs.remote is {remote} (expected 0 or 1)")),
        };
        match state {
            LOCAL => Ok(BlobState::Local { upstream }),
            REMOTE_ONLY if upstream => Ok(BlobState::RemoteOnly),
            REMOTE_ONLY => Err("a remote-only blob that no upstream holds".into()),
            QUARANTINED => Ok(BlobState::Quarantined { upstream }),
            _ => Err(format!(
                "blobs.state is {state} (known: 0 local, 1 remote only, 2 quarantined)"
            )),
        }
    }

    /// Reads the state from columns `i` (state) and `i + 1` (remote) of a row.
    pub(crate) fn from_row(r: &Row<'_>, i: usize) -> rusqlite::Result<BlobState> {
        let (state, remote): (i64, i64) = (r.get(i)?, r.get(i + 1)?);
        BlobState::from_columns(state, remote).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Integer, e.into())
        })
    }
}

impl crate::Store {
    /// The state of blob `h`, `None` if the store has no such blob.
    pub fn blob_state(&self, h: &Hash) -> Result<Option<BlobState>> {
        Ok(row(&self.conn(), h)?.map(|r| r.state))
    }
}

/// What the lifecycle knows of one blob.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlobRow {
    pub size: u64,
    pub state: BlobState,
    /// The blob file's inode number when it became local (0: never local).
    pub file_ino: i64,
}

/// The row of blob `h`, if any.
pub(crate) fn row(conn: &Connection, h: &Hash) -> Result<Option<BlobRow>> {
    let mut stmt =
        conn.prepare_cached("SELECT size, state, remote, file_ino FROM blobs WHERE hash = ?1")?;
    Ok(stmt
        .query_row([h], |r| {
            Ok(BlobRow {
                size: crate::codec::unsigned(r.get(0)?, "blobs.size")?,
                state: BlobState::from_row(r, 1)?,
                file_ino: r.get(3)?,
            })
        })
        .optional()?)
}

/// A writer committed content `h` under one more name: the blob is (or becomes) local with
/// the installed file `file_ino`; an upstream copy stays known.
pub(crate) fn commit_ref(
    conn: &Connection,
    h: &Hash,
    size: u64,
    file_ino: i64,
    access: i64,
    blocks: Option<i64>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO blobs (hash, size, refs, state, file_ino, last_access, blocks)
         VALUES (?1, ?2, 1, ?6, ?3, ?4, ?5)
         ON CONFLICT (hash) DO UPDATE SET refs = refs + 1, state = ?6, file_ino = ?3,
         last_access = ?4, blocks = ?5",
    )?
    .execute(params![h, size as i64, file_ino, access, blocks, LOCAL])?;
    Ok(())
}

/// A download of a remote-only blob was installed as `file_ino`. False (nothing changed)
/// when the blob is no longer remote-only: a write made it local meanwhile, or it is gone.
pub(crate) fn fetched(
    conn: &Connection,
    h: &Hash,
    file_ino: i64,
    access: i64,
    blocks: i64,
) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE blobs SET state = ?5, file_ino = ?2, last_access = ?3, blocks = ?4
             WHERE hash = ?1 AND state = ?6",
        )?
        .execute(params![h, file_ino, access, blocks, LOCAL, REMOTE_ONLY])?;
    Ok(n == 1)
}

/// Eviction drops the local bytes of a blob an upstream holds; every name stays.
pub(crate) fn drop_local(conn: &Connection, h: &Hash) -> Result<()> {
    conn.prepare_cached(
        "UPDATE blobs SET state = ?2, file_ino = 0 WHERE hash = ?1 AND state = ?3 AND remote = 1",
    )?
    .execute(params![h, REMOTE_ONLY, LOCAL])?;
    Ok(())
}

/// Verification found the file wrong or missing.
pub(crate) fn quarantine(conn: &Connection, h: &Hash) -> Result<()> {
    conn.prepare_cached("UPDATE blobs SET state = ?2 WHERE hash = ?1")?
        .execute(params![h, QUARANTINED])?;
    Ok(())
}

/// An upstream now holds a copy (a push finished).
pub(crate) fn mark_upstream(conn: &Connection, h: &Hash) -> Result<()> {
    conn.prepare_cached("UPDATE blobs SET remote = 1 WHERE hash = ?1")?
        .execute([h])?;
    Ok(())
}

/// A pulled manifest names blob `h` `n` times: a new row is remote-only, an existing one gains
/// the references and learns of the upstream copy. Returns the state after.
pub(crate) fn pull_ref(conn: &Connection, h: &Hash, size: u64, n: i64) -> Result<BlobState> {
    conn.prepare_cached(
        "INSERT INTO blobs (hash, size, refs, state, file_ino, last_access, remote)
         VALUES (?1, ?2, ?3, ?4, 0, 0, 1)
         ON CONFLICT (hash) DO UPDATE SET refs = refs + ?3, remote = 1",
    )?
    .execute(params![h, size as i64, n, REMOTE_ONLY])?;
    let st = row(conn, h)?.map(|r| r.state);
    st.ok_or_else(|| crate::Error::Remote(format!("blob {h} vanished while being pulled")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_round_trip_and_unknown_combinations_are_errors() {
        for st in [
            BlobState::Local { upstream: false },
            BlobState::Local { upstream: true },
            BlobState::RemoteOnly,
            BlobState::Quarantined { upstream: false },
            BlobState::Quarantined { upstream: true },
        ] {
            let (s, r) = st.to_columns();
            assert_eq!(BlobState::from_columns(s, r), Ok(st));
        }
        assert!(BlobState::from_columns(1, 0)
            .unwrap_err()
            .contains("no upstream"));
        assert!(BlobState::from_columns(3, 0)
            .unwrap_err()
            .contains("blobs.state is 3"));
        assert!(BlobState::from_columns(0, 2)
            .unwrap_err()
            .contains("blobs.remote is 2"));
    }

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c, std::path::Path::new(":memory:")).unwrap();
        c
    }

    #[test]
    fn transitions_follow_the_lifecycle_and_the_schema_refuses_other_states() {
        let c = db();
        let h = Hash([1; 32]);
        assert_eq!(pull_ref(&c, &h, 10, 2).unwrap(), BlobState::RemoteOnly);
        assert!(fetched(&c, &h, 77, 1, 8).unwrap());
        let r = row(&c, &h).unwrap().unwrap();
        assert_eq!(r.state, BlobState::Local { upstream: true });
        assert_eq!((r.size, r.file_ino), (10, 77));
        // Fetched twice (a second download finishing late): nothing changes.
        assert!(!fetched(&c, &h, 78, 2, 8).unwrap());
        drop_local(&c, &h).unwrap();
        assert_eq!(row(&c, &h).unwrap().unwrap().state, BlobState::RemoteOnly);
        commit_ref(&c, &h, 10, 79, 3, None).unwrap();
        assert_eq!(
            row(&c, &h).unwrap().unwrap().state,
            BlobState::Local { upstream: true }
        );
        quarantine(&c, &h).unwrap();
        assert_eq!(
            row(&c, &h).unwrap().unwrap().state,
            BlobState::Quarantined { upstream: true }
        );

        // A local blob no upstream holds is never made remote-only.
        let g = Hash([2; 32]);
        commit_ref(&c, &g, 5, 80, 4, Some(8)).unwrap();
        drop_local(&c, &g).unwrap();
        assert_eq!(
            row(&c, &g).unwrap().unwrap().state,
            BlobState::Local { upstream: false }
        );
        mark_upstream(&c, &g).unwrap();
        assert!(row(&c, &g).unwrap().unwrap().state.has_upstream_copy());

        // The schema itself refuses what the type cannot express.
        for bad in [
            "UPDATE blobs SET state = 7",
            "UPDATE blobs SET remote = 0, state = 1",
            "UPDATE blobs SET remote = 3",
            "UPDATE blobs SET size = -1",
        ] {
            let e = c.execute(bad, []).unwrap_err();
            assert!(e.to_string().contains("CHECK"), "{bad}: {e}");
        }
    }
}
