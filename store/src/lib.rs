//! kcache's store: content-addressed blob files plus one SQLite database holding the namespace.
//!
//! Layout of a store directory:
//! - `kcache.db` (WAL mode): volumes, inodes, directory entries, xattrs, blobs, counters;
//! - `blobs/<2 hex>/<64 hex>`: one read-only file per distinct content, named by its BLAKE3 hash;
//! - `staging/`: private files backing open writers, committed into `blobs/` by rename;
//! - `quarantine/`: blobs that failed verification;
//! - `lock`: held (flock) by the one process that owns the store.
//!
//! The store knows nothing of FUSE, kernels or command lines: it offers namespace transactions
//! and blob files, and keeps reference counts exact.

pub mod azure;
mod blobs;
mod codec;
mod downloads;
mod error;
mod faults;
mod fetch;
pub mod gcs;
mod lifecycle;
mod lru;
mod maint;
mod manifest;
mod merge;
mod ns;
pub mod objstore;
pub mod outboard;
mod remote;
pub mod s3;
mod savepoint;
mod schema;
mod snapshot;
mod staged;
mod sync;
mod tags;
mod union;
mod volumes;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags};

pub use blobs::{Blobs, Staged, StreamHasher, VerifyReport};
pub use error::{Error, Result};
pub use faults::{Fault, Faults, Step, CRASH_EXIT};
pub use fetch::Lease;
pub use lifecycle::BlobState;
pub use lru::{EvictPolicy, Evicted, Lru, ACCESS_BATCH};
pub use maint::{Counter, DuEntry, GcReport, Limits, MinFree, Removed};
pub use ns::{Namespace, Renamed, SetAttr, Stats, VolumeInfo};
pub use remote::{FetchConfig, Remote, Upstream};
pub use snapshot::{
    generate_key, public_key_of, NameChange, PullMode, PullReport, Pulled, PushProgress, PushReport,
};
pub use sync::{SyncKind, SyncOutcome, SyncStatus};
pub use volumes::VolumeSummary;

use error::IoContext;

/// Inode number as stored in the database.
pub type Ino = u64;

/// A BLAKE3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        blake3::Hash::from_hex(s).ok().map(|h| Hash(*h.as_bytes()))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

/// File types the namespace can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The `inodes.kind` column's code.
    pub(crate) fn code(self) -> i64 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    /// The kind of a code, `None` for a code the store never writes.
    pub(crate) fn from_code(v: i64) -> Option<Kind> {
        Some(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// One inode as the namespace records it. Times are nanoseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: Ino,
    pub volume: i64,
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub nlink: u32,
    pub rdev: u32,
    pub parent: Option<Ino>,
    pub blob: Option<Hash>,
    /// 512-byte blocks the blob's file takes on disk, when measured (see migration 5).
    pub blob_blocks: Option<u64>,
    pub target: Option<Vec<u8>>,
}

/// What a new inode is made of.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    /// Symlink target (exact bytes).
    pub target: Option<Vec<u8>>,
}

/// What statvfs says about the store's filesystem (block counts in `frsize` units).
#[derive(Clone, Copy, Debug)]
pub struct DiskSpace {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
}

impl DiskSpace {
    /// Bytes an unprivileged writer may still use.
    pub fn available_bytes(&self) -> u64 {
        self.bavail.saturating_mul(self.frsize as u64)
    }
}

/// Options for opening a store.
#[derive(Clone, Debug, Default)]
pub struct OpenOptionsStore {
    /// Open without taking the owner lock, for read-only inspection (`kcache stats`) while a
    /// daemon runs.
    pub read_only: bool,
}

/// How long namespace changes may wait in an open group before they are committed, when
/// group commit is on (the daemon): the most a crash of the daemon can lose.
pub const GROUP_COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Prepared statements each connection keeps. rusqlite's default (16) is fewer than the
/// statements one file's create, write, close and rename run, so they evicted each other
/// and SQLite parsed the same SQL again on every operation.
const STATEMENT_CACHE: usize = 256;

/// An open store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    read_only: bool,
    _lock: Option<File>,
    staging_seq: AtomicU64,
    /// The store directory, held open to ask its filesystem for free space without a path
    /// lookup on every write.
    root_dir: File,
    access_seq: AtomicU64,
    pending_access: Mutex<Vec<(Hash, i64)>>,
    pending_counters: [AtomicU64; 3],
    /// The downloads in flight, whichever mount (and upstreams) started them: one table for
    /// the store's whole life, so de-duplication and the shutdown drain see every download.
    downloads: std::sync::Arc<downloads::Downloads<fetch::Flight>>,
    /// Test seam over every protocol step (see `faults`); nothing is armed in production.
    faults: Faults,
    /// Group commit is on (`start_group_commit`).
    group: std::sync::atomic::AtomicBool,
    /// Row changes to `inodes` made through this store's connection (see `inode_changes`).
    inode_changes: std::sync::Arc<AtomicU64>,
    /// Staging files whose content a transaction still open (the group) recorded: deleted
    /// once it commits (`settle_group`), not before, so a crash in between finds them armed
    /// and keeps their content (see `Blobs::retire_staging`).
    retired_staging: Mutex<Vec<PathBuf>>,
    /// This store began the connection's open transaction as a group (`conn`) and has not
    /// committed it yet. Read and written under the connection lock.
    group_open: std::sync::atomic::AtomicBool,
    /// Why the store stopped taking changes: SQLite rolled back a group whose changes had
    /// been acknowledged (see `group_lost`). Set once, never cleared in this process.
    halted: std::sync::OnceLock<String>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store at `root` and takes its owner lock.
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_with(root, &OpenOptionsStore::default())
    }

    pub fn open_with(root: &Path, opts: &OpenOptionsStore) -> Result<Store> {
        let db_path = root.join("kcache.db");
        if opts.read_only {
            if !db_path.exists() {
                return Err(Error::io(
                    format!("opening store {}", root.display()),
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ));
            }
            let conn = Connection::open_with_flags(
                &db_path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            check_readable(&conn, &db_path)?;
            return Ok(Store {
                root_dir: File::open(root).ctx(|| format!("opening {}", root.display()))?,
                root: root.to_owned(),
                db_path,
                conn: Mutex::new(conn),
                read_only: true,
                _lock: None,
                staging_seq: AtomicU64::new(staging_seq_start()),
                access_seq: AtomicU64::new(0),
                pending_access: Mutex::new(Vec::new()),
                pending_counters: Default::default(),
                downloads: Default::default(),
                faults: Faults::default(),
                group: Default::default(),
                inode_changes: Default::default(),
                retired_staging: Default::default(),
                group_open: Default::default(),
                halted: Default::default(),
            });
        }

        fs::create_dir_all(root).ctx(|| format!("creating store directory {}", root.display()))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .ctx(|| format!("opening {}", lock_path.display()))?;
        match take_owner_lock(&lock) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Locked {
                    path: root.to_owned(),
                    lock: lock_path,
                })
            }
            Err(err) => return Err(Error::io(format!("locking {}", lock_path.display()), err)),
        }
        for sub in ["blobs", "staging", "quarantine"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }

        let mut conn = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        schema::migrate(&mut conn, &db_path)?;
        // WAL: readers (kcache stats) never block the daemon. synchronous=NORMAL keeps every
        // committed transaction across a crash of the process; fsync() from a caller upgrades
        // its own commit to FULL.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", false)?;
        // Every inserted, updated or deleted inode row, whichever statement or trigger did
        // it: the cheap "has anything changed since" that lets a close skip rereading an
        // inode (see `inode_changes`). Counted even for changes later rolled back, which only
        // makes the answer more cautious.
        let inode_changes = std::sync::Arc::new(AtomicU64::new(0));
        let counter = inode_changes.clone();
        conn.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| {
                if table == "inodes" {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            },
        ))?;

        let store = Store {
            root_dir: File::open(root).ctx(|| format!("opening {}", root.display()))?,
            root: root.to_owned(),
            db_path,
            conn: Mutex::new(conn),
            read_only: false,
            _lock: Some(lock),
            staging_seq: AtomicU64::new(staging_seq_start()),
            access_seq: AtomicU64::new(0),
            pending_access: Mutex::new(Vec::new()),
            pending_counters: Default::default(),
            downloads: Default::default(),
            faults: Faults::default(),
            group: Default::default(),
            inode_changes,
            retired_staging: Default::default(),
            group_open: Default::default(),
            halted: Default::default(),
        };
        store.recover()?;
        let seq: i64 =
            store
                .conn()
                .query_row("SELECT coalesce(max(last_access), 0) FROM blobs", [], |r| {
                    r.get(0)
                })?;
        store
            .access_seq
            .store(seq.max(0) as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(store)
    }

    /// True when no process holds the store's owner lock (used to wait for a daemon to exit).
    /// The probe holds the lock for a moment; `Store::open` rides over such moments.
    pub fn open_lock_probe(root: &Path) -> Result<bool> {
        let lock_path = root.join("lock");
        let lock = File::open(&lock_path).ctx(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a valid, owned descriptor; closing it releases the probe lock.
        let got = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(got)
    }

    /// Capacity and free space of the filesystem the store lives on.
    pub fn disk_space(&self) -> Result<DiskSpace> {
        // SAFETY: fstatvfs fills the zeroed struct for a descriptor we own.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.root_dir.as_raw_fd(), &mut s) } != 0 {
            return Err(Error::io(
                format!("statvfs of {}", self.root.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(DiskSpace {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            frsize: s.f_frsize as u32,
        })
    }

    /// Begins a store transaction (a savepoint: see `commit_tx`), unless the store has
    /// stopped taking changes: then nothing is written at all, so there is nothing to roll
    /// back either (a rollback on the full disk that halted it can fail too).
    pub(crate) fn begin_tx<'c>(&self, conn: &'c Connection) -> Result<savepoint::Savepoint<'c>> {
        self.check_running()?;
        Ok(savepoint::Savepoint::begin(conn)?)
    }

    /// Commits a transaction: every protocol's commit point, so faults can be injected there.
    /// Outside group commit the savepoint is the outermost, so this is the transaction's
    /// commit; inside a group it joins the group (see `start_group_commit`).
    pub(crate) fn commit_tx(&self, tx: savepoint::Savepoint<'_>) -> Result<()> {
        self.faults.check(Step::DbCommit)?;
        tx.commit()?;
        Ok(())
    }

    /// Group commit: from now on every transaction joins one open database transaction
    /// that is committed at most `interval` after it began (by a thread of its own), at
    /// `sync` (fsync), before blob files whose rows went away are deleted, and when the store
    /// is dropped. A crash of the process then loses at most the last interval of namespace
    /// changes, and what it keeps is a prefix of what was done (one transaction, in order).
    pub fn start_group_commit(self: &std::sync::Arc<Self>, interval: std::time::Duration) {
        if self.read_only || self.group.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let weak = std::sync::Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(store) = weak.upgrade() else { return };
                if let Err(e) = store.commit_group() {
                    tracing::error!(error = %e, "group commit failed; retrying");
                }
            });
        if let Err(e) = spawned {
            // Without the committing thread, stay with one commit per transaction.
            self.group.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(error = %e, "no thread for group commit; committing each change");
        }
    }

    /// Commits the open group, if any (everything done so far becomes visible to other
    /// processes and survives a crash of this one).
    pub fn commit_group(&self) -> Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        self.settle_group(&conn)
    }

    /// Commits the connection's open group, if any, then deletes the staging files whose
    /// content it recorded (`retired_staging`). The caller holds the connection lock, so no
    /// transaction can record newer content for the same inodes in between.
    pub(crate) fn settle_group(&self, conn: &Connection) -> Result<()> {
        let ord = std::sync::atomic::Ordering::SeqCst;
        if conn.is_autocommit() {
            self.notice_lost_group(conn);
            return Ok(());
        }
        let committed = match self.faults.check(Step::GroupCommit) {
            Ok(()) => conn.execute_batch("COMMIT").map_err(Error::from),
            Err(e) => {
                // An injected failure does what SQLite does when a COMMIT fails with a full
                // disk or an I/O error (checked on a full tmpfs): it rolls everything back.
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        };
        if let Err(e) = committed {
            if conn.is_autocommit() && self.group_open.load(ord) {
                self.group_lost(&format!("its commit failed: {e}"));
            }
            // Otherwise (a busy database) the group is still open and the next try commits it.
            return Err(e);
        }
        self.group_open.store(false, ord);
        let retired = std::mem::take(
            &mut *self
                .retired_staging
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for path in retired {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "deleting a committed staging file failed");
                }
            }
        }
        Ok(())
    }

    /// Halts the store if the group it opened is gone without its COMMIT: SQLite rolled
    /// it back when one of its statements failed (a page spill on a full disk). The caller
    /// holds the connection lock.
    fn notice_lost_group(&self, conn: &Connection) {
        if conn.is_autocommit() && self.group_open.load(std::sync::atomic::Ordering::SeqCst) {
            self.group_lost("a statement of the group failed and SQLite rolled it back");
        }
    }

    /// SQLite rolled back the open group: changes the filesystem has already acknowledged
    /// (up to one group-commit interval of them) are gone from the database, while the
    /// kernel and the daemon's open files still believe them. Building on that would put
    /// new rows on top of missing ones (a rename of a file whose create is gone, inode
    /// numbers handed out twice), so the store stops taking changes, as ext4 remounts
    /// read-only on a journal error: every later transaction and fsync fails with EIO,
    /// reads go on from the last committed state. The staging files the lost group had
    /// recorded are kept (not deleted at the next commit) so that the next open of the
    /// store recovers their content, as after a crash.
    fn group_lost(&self, cause: &str) {
        self.group_open
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let kept = std::mem::take(
            &mut *self
                .retired_staging
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let why = format!(
            "the database rolled back the last {} ms of changes ({cause}); remount to recover",
            GROUP_COMMIT_INTERVAL.as_millis()
        );
        tracing::error!(
            staging_files_kept = kept.len(),
            "{why}: the store takes no more changes"
        );
        let _ = self.halted.set(why);
    }

    /// Fails once the store has stopped taking changes (see `group_lost`).
    pub(crate) fn check_running(&self) -> Result<()> {
        match self.halted.get() {
            Some(why) => Err(Error::Halted(why.clone())),
            None => Ok(()),
        }
    }

    /// Why the store stopped taking changes, if it did (see `group_lost`).
    pub fn halted(&self) -> Option<&str> {
        self.halted.get().map(String::as_str)
    }

    /// The connection outside any group: what was grouped so far is committed first, and no
    /// new group begins, so the caller's transaction is a transaction of its own (durable
    /// commits, pragmas, checkpoints).
    pub(crate) fn conn_direct(&self) -> Result<MutexGuard<'_, Connection>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        self.settle_group(&conn)?;
        self.check_running()?;
        Ok(conn)
    }

    /// A count of the inode-row changes made so far. Equal values read before and after
    /// something mean no inode row changed in between (no link count, no attribute), so
    /// what was read of any inode before the first is still true. A read-only store cannot
    /// see the owner's changes: every call returns a new value.
    pub fn inode_changes(&self) -> u64 {
        let ord = std::sync::atomic::Ordering::SeqCst;
        if self.read_only {
            return self.inode_changes.fetch_add(1, ord);
        }
        self.inode_changes.load(ord)
    }

    /// The fault plan tests arm to make a protocol step fail or crash.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (the transaction
        // rolls back on drop), so a poisoned mutex is safe to keep using.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if self.group.load(std::sync::atomic::Ordering::Relaxed) && conn.is_autocommit() {
            self.notice_lost_group(&conn);
            if self.halted.get().is_none() {
                // Open the group; a failure leaves each transaction committing on its own.
                match conn.execute_batch("BEGIN IMMEDIATE") {
                    Ok(()) => self
                        .group_open
                        .store(true, std::sync::atomic::Ordering::SeqCst),
                    Err(e) => tracing::warn!(error = %e, "could not open a group commit"),
                }
            }
        }
        conn
    }

    /// Undoes what a crash left behind: staging files (committing what was written to
    /// still-linked files in this boot, see `staged`), unlinked inodes nobody holds any more,
    /// and blob files whose rows were already deleted.
    fn recover(&self) -> Result<()> {
        let r = self.recover_staging()?;
        if r.kept > 0 {
            tracing::info!(
                files = r.kept,
                "kept what was written to files before the daemon stopped"
            );
        }
        if r.removed > 0 {
            tracing::info!(
                count = r.removed,
                "removed staging files left by an earlier crash"
            );
        }
        let purged = self.ns().purge_unlinked()?;
        if purged > 0 {
            tracing::info!(
                count = purged,
                "purged unlinked inodes left open at an earlier shutdown"
            );
        }
        self.blobs().sweep_dead_blobs()?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Keep the LRU order of the last accesses across a clean shutdown.
        if let Err(e) = self.lru().flush_accesses() {
            tracing::warn!(error = %e, "recording the last accesses failed");
        }
        // And everything grouped since the last group commit.
        if let Err(e) = self.commit_group() {
            tracing::error!(error = %e, "committing the last group at close failed");
        }
    }
}

/// Where this process's staging file numbers start: the time, so that a later run's staging
/// files sort after an earlier run's (recovery keeps the newest armed file of an inode).
fn staging_seq_start() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn check_readable(conn: &Connection, path: &Path) -> Result<()> {
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| Error::Foreign {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if app_id != schema::APPLICATION_ID {
        return Err(Error::Foreign {
            path: path.to_owned(),
            reason: format!("application id {app_id:#x}"),
        });
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > schema::LATEST {
        return Err(Error::NewerSchema {
            path: path.to_owned(),
            found: version,
            known: schema::LATEST,
        });
    }
    // A read-only opener cannot migrate; a store nobody opened since an upgrade says so.
    if version < schema::LATEST {
        return Err(Error::OlderSchema {
            path: path.to_owned(),
            found: version,
            known: schema::LATEST,
        });
    }
    Ok(())
}

/// Current time in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos() as i64
}

/// Takes the store's owner lock. Other commands probe the lock by taking it for a moment
/// (`open_lock_probe`), so a refusal is retried for a short while before it counts: only a
/// lock still held after that belongs to another owner.
fn take_owner_lock(lock: &File) -> std::io::Result<bool> {
    const PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);
    let start = std::time::Instant::now();
    loop {
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err);
        }
        if start.elapsed() >= PATIENCE {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
