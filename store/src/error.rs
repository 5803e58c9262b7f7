//! The store's error type: every variant names what was wrong and maps to one errno.

use std::path::PathBuf;

use crate::Hash;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("no such attribute")]
    NoAttr,
    #[error("too many links")]
    TooManyLinks,
    #[error("no space left on the store's disk")]
    NoSpace,
    #[error("store at {path} is in use by another kcache process (lock {lock} held)", lock = .lock.display(), path = .path.display())]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("store database {path} was written by a newer kcache (schema {found}, this build knows up to {known}); refusing to touch it", path = .path.display())]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("store database {path} has schema {found} and this kcache needs {known}; mount the store once (or run `kcache gc --store`) to upgrade it", path = .path.display())]
    OlderSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{path} is not a kcache store database: {reason}", path = .path.display())]
    Foreign { path: PathBuf, reason: String },
    #[error("blob {hash} is damaged: {reason}")]
    BadBlob { hash: Hash, reason: String },
    #[error("blob {hash} is not on local disk")]
    NotLocal { hash: Hash },
    #[error("pinning this would pin {pinned} bytes, more than half the quota ({limit} bytes)")]
    PinLimit { pinned: u64, limit: u64 },
    #[error("fetching blob {hash}: {reason}")]
    Fetch { hash: Hash, reason: String },
    #[error("remote: {0}")]
    Remote(String),
    #[error("no such volume: {0}")]
    NoVolume(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the store takes no more changes: {0}")]
    Halted(String),
    #[error("store database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("upgrading store database {path} to schema {to} failed, nothing was changed: {reason}", path = .path.display())]
    Migration {
        path: PathBuf,
        to: i64,
        reason: String,
    },
}

impl Error {
    /// The errno a filesystem caller should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound | Error::NoVolume(_) => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::Invalid(_) => libc::EINVAL,
            Error::NotPermitted(_) => libc::EPERM,
            Error::NoAttr => libc::ENODATA,
            Error::TooManyLinks => libc::EMLINK,
            Error::NoSpace | Error::PinLimit { .. } => libc::ENOSPC,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                Some(e) => e,
                None => libc::EIO,
            },
            Error::Db(e) if is_db_full(e) => libc::ENOSPC,
            _ => libc::EIO,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace;
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

fn is_db_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description of what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
