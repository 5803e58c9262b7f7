//! Numbered schema migrations for `kcache.db`; the schema version lives in `PRAGMA user_version`.

use std::path::Path;

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Marks a database as ours ("kcac"), so a foreign SQLite file is never migrated over.
pub const APPLICATION_ID: i64 = 0x6b63_6163;

/// Each entry upgrades the schema from version `i` to `i + 1`. Never edit a released entry:
/// append a new one.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    r#"
    CREATE TABLE volumes (
        id      INTEGER PRIMARY KEY,
        name    TEXT NOT NULL UNIQUE,
        root    INTEGER NOT NULL,
        created INTEGER NOT NULL
    );
    -- Every file, directory and symlink of every volume. `parent` is kept for directories only
    -- (rename cycle checks and "..").
    CREATE TABLE inodes (
        ino     INTEGER PRIMARY KEY AUTOINCREMENT,
        volume  INTEGER NOT NULL,
        kind    INTEGER NOT NULL,
        mode    INTEGER NOT NULL,
        uid     INTEGER NOT NULL,
        gid     INTEGER NOT NULL,
        size    INTEGER NOT NULL DEFAULT 0,
        atime   INTEGER NOT NULL,
        mtime   INTEGER NOT NULL,
        ctime   INTEGER NOT NULL,
        nlink   INTEGER NOT NULL,
        rdev    INTEGER NOT NULL DEFAULT 0,
        parent  INTEGER,
        blob    BLOB REFERENCES blobs(hash),
        target  BLOB
    );
    CREATE INDEX inodes_blob ON inodes(blob) WHERE blob IS NOT NULL;
    CREATE INDEX inodes_unlinked ON inodes(nlink) WHERE nlink = 0;
    -- Directory entries. `id` is the readdir cookie: it only grows, so a listing that continues
    -- after concurrent changes never repeats or skips an entry that stayed put.
    CREATE TABLE dirents (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        parent  INTEGER NOT NULL,
        name    BLOB NOT NULL,
        ino     INTEGER NOT NULL,
        UNIQUE (parent, name)
    );
    CREATE INDEX dirents_ino ON dirents(ino);
    CREATE TABLE xattrs (
        ino     INTEGER NOT NULL,
        name    BLOB NOT NULL,
        value   BLOB NOT NULL,
        PRIMARY KEY (ino, name)
    ) WITHOUT ROWID;
    -- One row per distinct content. state: 0 present on local disk, 1 remote only,
    -- 2 quarantined (failed verification). `file_ino` is the blob file's inode number, to notice
    -- a file replaced behind the daemon's back.
    CREATE TABLE blobs (
        hash        BLOB PRIMARY KEY,
        size        INTEGER NOT NULL,
        refs        INTEGER NOT NULL,
        state       INTEGER NOT NULL DEFAULT 0,
        file_ino    INTEGER NOT NULL DEFAULT 0,
        last_access INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    -- Blob files whose rows were deleted in a committed transaction but whose files may still be
    -- on disk (a crash between commit and unlink). Swept at open.
    CREATE TABLE dead_blobs (
        hash BLOB PRIMARY KEY
    ) WITHOUT ROWID;
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 1 -> 2: eviction walks blobs in LRU order.
    r#"
    CREATE INDEX blobs_lru ON blobs(last_access);
    "#,
    // 2 -> 3: quota bookkeeping, pins and settings.
    r#"
    -- Bytes of local blobs, kept exact by triggers in the same transactions that change
    -- `blobs`, so reading usage is one row, not a scan.
    INSERT OR REPLACE INTO counters (name, value)
        SELECT 'stored_bytes', coalesce(sum(size), 0) FROM blobs WHERE state = 0;
    CREATE TRIGGER blobs_usage_insert AFTER INSERT ON blobs WHEN NEW.state = 0
    BEGIN
        UPDATE counters SET value = value + NEW.size WHERE name = 'stored_bytes';
    END;
    CREATE TRIGGER blobs_usage_delete AFTER DELETE ON blobs WHEN OLD.state = 0
    BEGIN
        UPDATE counters SET value = value - OLD.size WHERE name = 'stored_bytes';
    END;
    CREATE TRIGGER blobs_usage_update AFTER UPDATE OF state, size ON blobs
    BEGIN
        UPDATE counters SET value = value
            - (CASE WHEN OLD.state = 0 THEN OLD.size ELSE 0 END)
            + (CASE WHEN NEW.state = 0 THEN NEW.size ELSE 0 END)
        WHERE name = 'stored_bytes';
    END;
    -- Inodes (files or whole trees) that eviction must leave alone.
    CREATE TABLE pins (
        ino     INTEGER PRIMARY KEY,
        created INTEGER NOT NULL
    );
    CREATE TRIGGER inodes_unpin AFTER DELETE ON inodes
    BEGIN
        DELETE FROM pins WHERE ino = OLD.ino;
    END;
    -- Persistent configuration of the store (quota, watermarks).
    CREATE TABLE settings (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    -- Recency becomes a clock: nanoseconds since the epoch, kept strictly increasing (see
    -- lru.rs). Earlier sequence numbers are moved to end now, in the same order.
    UPDATE blobs SET last_access =
        CAST((julianday('now') - 2440587.5) * 86400000000000.0 AS INTEGER)
        - (SELECT coalesce(max(last_access), 0) FROM blobs) + last_access;
    "#,
    // 3 -> 4: the remote tier.
    r#"
    -- 1 when an upstream holds a copy: eviction then drops only the local bytes.
    ALTER TABLE blobs ADD COLUMN remote INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4 -> 5: sparse files.
    r#"
    -- 512-byte blocks the blob file takes on disk (its st_blocks when it became local), so
    -- st_blocks and `du` are honest for sparse files without a stat per getattr. NULL: not
    -- measured (rows from before this migration, blobs never local); readers then assume
    -- the logical size.
    ALTER TABLE blobs ADD COLUMN blocks INTEGER;
    "#,
    // 5 -> 6: the blob lifecycle (lifecycle.rs) enforced by the schema. SQLite cannot add a
    // CHECK to a table, so `blobs` is rebuilt (its index and triggers go with the old table
    // and are made again, unchanged). A row the type cannot express fails the migration, and
    // the store does not open, rather than being read as some default state.
    r#"
    CREATE TABLE blobs_v6 (
        hash        BLOB PRIMARY KEY CHECK (typeof(hash) = 'blob' AND length(hash) = 32),
        size        INTEGER NOT NULL CHECK (size >= 0),
        refs        INTEGER NOT NULL,
        -- 0 local, 1 remote only, 2 quarantined
        state       INTEGER NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2)),
        file_ino    INTEGER NOT NULL DEFAULT 0,
        last_access INTEGER NOT NULL DEFAULT 0,
        remote      INTEGER NOT NULL DEFAULT 0 CHECK (remote IN (0, 1)),
        blocks      INTEGER CHECK (blocks IS NULL OR blocks >= 0),
        -- Remote-only bytes must be somewhere.
        CHECK (state != 1 OR remote = 1)
    ) WITHOUT ROWID;
    INSERT INTO blobs_v6 (hash, size, refs, state, file_ino, last_access, remote, blocks)
        SELECT hash, size, refs, state, file_ino, last_access, remote, blocks FROM blobs;
    DROP TABLE blobs;
    ALTER TABLE blobs_v6 RENAME TO blobs;
    CREATE INDEX blobs_lru ON blobs(last_access);
    CREATE TRIGGER blobs_usage_insert AFTER INSERT ON blobs WHEN NEW.state = 0
    BEGIN
        UPDATE counters SET value = value + NEW.size WHERE name = 'stored_bytes';
    END;
    CREATE TRIGGER blobs_usage_delete AFTER DELETE ON blobs WHEN OLD.state = 0
    BEGIN
        UPDATE counters SET value = value - OLD.size WHERE name = 'stored_bytes';
    END;
    CREATE TRIGGER blobs_usage_update AFTER UPDATE OF state, size ON blobs
    BEGIN
        UPDATE counters SET value = value
            - (CASE WHEN OLD.state = 0 THEN OLD.size ELSE 0 END)
            + (CASE WHEN NEW.state = 0 THEN NEW.size ELSE 0 END)
        WHERE name = 'stored_bytes';
    END;
    "#,
    // 6 -> 7: what background push and follow (mount options push=, follow=) last did, so
    // `kcache stats` reports it the same whether the daemon or the command answers.
    r#"
    CREATE TABLE sync_state (
        kind         TEXT NOT NULL CHECK (kind IN ('push', 'follow')),
        url          TEXT NOT NULL,
        tag          TEXT NOT NULL,
        volume       TEXT NOT NULL,
        last_ok      INTEGER CHECK (last_ok IS NULL OR last_ok >= 0),
        last_attempt INTEGER CHECK (last_attempt IS NULL OR last_attempt >= 0),
        last_error   TEXT,
        runs         INTEGER NOT NULL DEFAULT 0 CHECK (runs >= 0),
        errors       INTEGER NOT NULL DEFAULT 0 CHECK (errors >= 0),
        blobs_moved  INTEGER NOT NULL DEFAULT 0 CHECK (blobs_moved >= 0),
        bytes_moved  INTEGER NOT NULL DEFAULT 0 CHECK (bytes_moved >= 0),
        PRIMARY KEY (kind, url, tag, volume)
    ) WITHOUT ROWID;
    "#,
];

pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// Brings the database at `path` to the latest schema, refusing foreign or newer databases.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let foreign = |reason: String| Error::Foreign {
        path: path.to_owned(),
        reason,
    };
    // The first read of a damaged or non-SQLite file fails here; say so instead of "database
    // error", and never try to repair it (that could overwrite someone's data).
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| foreign(e.to_string()))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| foreign(e.to_string()))?;
    if app_id != APPLICATION_ID && !(app_id == 0 && tables == 0) {
        return Err(foreign(format!(
            "application id {app_id:#x} with {tables} schema objects"
        )));
    }
    if version > LATEST {
        return Err(Error::NewerSchema {
            path: path.to_owned(),
            found: version,
            known: LATEST,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| Error::Migration {
            path: path.to_owned(),
            to: (i + 1) as i64,
            reason: e.to_string(),
        })?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database as schema `v` left it.
    fn at_version(v: usize) -> Connection {
        let c = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..v] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        c.pragma_update(None, "user_version", v as i64).unwrap();
        c
    }

    fn stored(c: &Connection) -> i64 {
        c.query_row(
            "SELECT value FROM counters WHERE name = 'stored_bytes'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn schema_6_keeps_every_blob_row_and_the_usage_triggers() {
        let mut c = at_version(5);
        for (i, size, state, remote) in [(0u8, 10, 0, 0), (1, 20, 1, 1), (2, 30, 2, 0)] {
            c.execute(
                "INSERT INTO blobs (hash, size, refs, state, remote) VALUES (?1, ?2, 1, ?3, ?4)",
                rusqlite::params![[i; 32], size, state, remote],
            )
            .unwrap();
        }
        assert_eq!(stored(&c), 10);
        migrate(&mut c, Path::new("test.db")).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(stored(&c), 10);
        // The triggers came back with the table.
        c.execute("UPDATE blobs SET state = 0 WHERE size = 20", [])
            .unwrap();
        assert_eq!(stored(&c), 30);
        c.execute("DELETE FROM blobs WHERE size = 10", []).unwrap();
        assert_eq!(stored(&c), 20);
        c.execute(
            "INSERT INTO blobs (hash, size, refs) VALUES (?1, 5, 1)",
            [[3u8; 32]],
        )
        .unwrap();
        assert_eq!(stored(&c), 25);
        let idx: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'blobs_lru'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(idx, 1);
    }

    #[test]
    fn schema_6_refuses_a_row_the_lifecycle_cannot_express_and_changes_nothing() {
        let mut c = at_version(5);
        c.execute(
            "INSERT INTO blobs (hash, size, refs, state, remote) VALUES (zeroblob(32), 1, 1, 5, 0)",
            [],
        )
        .unwrap();
        let e = migrate(&mut c, Path::new("test.db")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("schema 6") && msg.contains("CHECK"), "{msg}");
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 5, "the failed upgrade rolled back");
        let state: i64 = c
            .query_row("SELECT state FROM blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(state, 5);
    }
}
