//! A savepoint whose SQL statements are prepared once per connection.
//!
//! Every namespace change is a savepoint (inside the open group transaction, see
//! `Store::start_group_commit`, or a transaction of its own outside one). rusqlite's
//! `Savepoint` runs `SAVEPOINT`/`RELEASE` through `execute_batch`, which parses the SQL again
//! each time: in a profile of small-file creation, that parsing was ~7% of the daemon's CPU.
//! This type runs the same statements from the connection's statement cache. All savepoints
//! share one name: SQLite releases or rolls back to the innermost savepoint of a name, which is
//! the one this guard opened, so nesting works as with distinct names.

use std::ops::Deref;

use rusqlite::Connection;

/// An open savepoint on `conn`; rolled back when dropped without `commit`.
pub(crate) struct Savepoint<'c> {
    conn: &'c Connection,
    done: bool,
}

impl<'c> Savepoint<'c> {
    pub(crate) fn begin(conn: &'c Connection) -> rusqlite::Result<Savepoint<'c>> {
        conn.prepare_cached("SAVEPOINT kc")?.execute([])?;
        Ok(Savepoint { conn, done: false })
    }

    /// Releases the savepoint: the outermost one commits the transaction. On an error (a
    /// busy database at commit) the savepoint stays open and is rolled back on drop.
    pub(crate) fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("RELEASE kc")?.execute([])?;
        self.done = true;
        Ok(())
    }

    fn rollback(&self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("ROLLBACK TO kc")?.execute([])?;
        self.conn.prepare_cached("RELEASE kc")?.execute([])?;
        Ok(())
    }

    /// What a failed `rollback` leaves behind is unknown (half of a failed change could be
    /// committed later with whatever encloses it), so the whole transaction goes: outside a
    /// group that is just this savepoint's; inside one, the store sees its group gone at the
    /// next transaction and stops taking changes (`Store::group_lost`).
    fn abandon(&self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %e, "rolling back a transaction failed");
            }
        }
    }
}

impl Deref for Savepoint<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.rollback() {
                tracing::error!(error = %e, "rolling back a savepoint failed; rolling back its whole transaction");
                self.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        c
    }

    fn count(c: &Connection) -> i64 {
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_committed_savepoint_keeps_its_rows_and_a_dropped_one_does_not() {
        let c = db();
        let sp = Savepoint::begin(&c).unwrap();
        sp.execute("INSERT INTO t VALUES (1)", []).unwrap();
        sp.commit().unwrap();
        assert!(
            c.is_autocommit(),
            "the outermost release ends the transaction"
        );
        {
            let sp = Savepoint::begin(&c).unwrap();
            sp.execute("INSERT INTO t VALUES (2)", []).unwrap();
        }
        assert_eq!(count(&c), 1);
        assert!(c.is_autocommit());
    }

    #[test]
    fn nested_savepoints_of_one_name_roll_back_only_the_inner_one() {
        let c = db();
        let outer = Savepoint::begin(&c).unwrap();
        outer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        {
            let inner = Savepoint::begin(&c).unwrap();
            inner.execute("INSERT INTO t VALUES (2)", []).unwrap();
        }
        let inner = Savepoint::begin(&c).unwrap();
        inner.execute("INSERT INTO t VALUES (3)", []).unwrap();
        inner.commit().unwrap();
        assert!(!c.is_autocommit(), "the outer savepoint is still open");
        outer.commit().unwrap();
        let xs: Vec<i64> = c
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(xs, vec![1, 3]);
    }

    #[test]
    fn inside_an_open_transaction_a_savepoint_joins_it() {
        let c = db();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        let sp = Savepoint::begin(&c).unwrap();
        sp.execute("INSERT INTO t VALUES (1)", []).unwrap();
        sp.commit().unwrap();
        assert!(!c.is_autocommit(), "the group stays open");
        c.execute_batch("ROLLBACK").unwrap();
        assert_eq!(count(&c), 0);
    }

    #[test]
    fn a_savepoint_that_cannot_be_rolled_back_takes_its_whole_transaction_with_it() {
        let c = db();
        c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
            .unwrap();
        {
            let sp = Savepoint::begin(&c).unwrap();
            sp.execute("INSERT INTO t VALUES (2)", []).unwrap();
            // Gone behind the guard's back: its `ROLLBACK TO` fails.
            sp.execute_batch("RELEASE kc").unwrap();
        }
        assert!(
            c.is_autocommit(),
            "a failed change was left inside the open transaction"
        );
        assert_eq!(count(&c), 0);
    }
}
