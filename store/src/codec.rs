//! Strict conversions between database columns and Rust values: a value the store never
//! writes (a hash that is not 32 bytes, an unknown file kind, a negative count) is an error
//! naming the value, never a default that would quietly turn into something else.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::{Hash, Kind};

fn bad(what: String) -> FromSqlError {
    FromSqlError::Other(what.into())
}

impl FromSql for Hash {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let b = v.as_blob()?;
        <[u8; 32]>::try_from(b)
            .map(Hash)
            .map_err(|_| bad(format!("a blob hash of {} bytes (expected 32)", b.len())))
    }
}

impl ToSql for Hash {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(&self.0[..]))
    }
}

impl FromSql for Kind {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let n = v.as_i64()?;
        Kind::from_code(n).ok_or_else(|| bad(format!("inode kind {n} (known: 1 to 7)")))
    }
}

impl ToSql for Kind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.code()))
    }
}

/// A count or size column: never negative.
pub(crate) fn unsigned(v: i64, column: &str) -> rusqlite::Result<u64> {
    u64::try_from(v).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Integer,
            format!("{column} is {v} (must not be negative)").into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn hashes_and_kinds_round_trip_and_bad_values_are_errors_naming_them() {
        let c = Connection::open_in_memory().unwrap();
        let h = Hash([7; 32]);
        let back: Hash = c.query_row("SELECT ?1", [h], |r| r.get(0)).unwrap();
        assert_eq!(back, h);
        let short = c
            .query_row("SELECT x'0102'", [], |r| r.get::<_, Hash>(0))
            .unwrap_err();
        assert!(short.to_string().contains("2 bytes"), "{short}");
        for k in [Kind::File, Kind::Dir, Kind::Symlink, Kind::BlockDev] {
            let back: Kind = c.query_row("SELECT ?1", [k], |r| r.get(0)).unwrap();
            assert_eq!(back, k);
        }
        let unknown = c
            .query_row("SELECT 9", [], |r| r.get::<_, Kind>(0))
            .unwrap_err();
        assert!(unknown.to_string().contains("inode kind 9"), "{unknown}");
        assert!(unsigned(-1, "blocks")
            .unwrap_err()
            .to_string()
            .contains("blocks is -1"));
        assert_eq!(unsigned(5, "blocks").unwrap(), 5);
    }
}
