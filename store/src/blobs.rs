//! Blob files: staging, hashing, committing into `blobs/`, opening with checks, verification.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rusqlite::{params, OptionalExtension};

use crate::error::{Error, IoContext, Result};
use crate::faults::Step;
use crate::lifecycle::{self, BlobState};
use crate::{Hash, Ino, Store};

/// What `commit_staged` needs to know about the staged file.
pub struct Staged<'a> {
    pub ino: Ino,
    pub path: &'a Path,
    pub file: &'a File,
    /// The content's hash and size if the caller computed them while the bytes were written;
    /// else the file is read and hashed here.
    pub known: Option<(Hash, u64)>,
    /// The caller asked for durability (fsync): data and the database commit reach the disk.
    pub durable: bool,
    pub mtime: i64,
}

/// Hashes content as it is written in order, so a commit need not read it back.
#[derive(Clone, Default)]
pub struct StreamHasher {
    hasher: blake3::Hasher,
}

impl StreamHasher {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.hasher.count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn finish(&self) -> (Hash, u64) {
        (
            Hash(*self.hasher.finalize().as_bytes()),
            self.hasher.count(),
        )
    }
}

/// Hashes a file with holes: the data extents (SEEK_DATA/SEEK_HOLE) are read, the holes are
/// hashed as the zeros they read as, from a constant buffer. Reading holes through a map
/// would fill the page cache with zero pages as large as the file (100 MiB for a 100 MiB
/// file of one byte). A range reported as a hole never holds data, so the hash is the same.
fn hash_sparse(path: &Path, hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(len).min(len);
        while pos < data {
            let n = (data - pos).min(ZEROS.len() as u64) as usize;
            hasher.update_rayon(&ZEROS[..n]);
            pos += n as u64;
        }
        if pos >= len {
            break;
        }
        // Past `data` by definition; anything else would loop, so read the rest instead.
        let hole = seek(data, libc::SEEK_HOLE)?
            .filter(|&h| h > data)
            .unwrap_or(len)
            .min(len);
        while pos < hole {
            let n = (hole - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            hasher.update_rayon(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(())
}

/// Report of `Store::verify`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    pub quarantined: Vec<String>,
    pub missing: Vec<String>,
    pub stray_removed: u64,
    pub bad_refcounts: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.quarantined.is_empty() && self.missing.is_empty() && self.bad_refcounts == 0
    }
}

impl Store {
    /// Hashes a file's whole content.
    pub fn hash_path(path: &Path) -> Result<(Hash, u64)> {
        let sparse = fs::metadata(path)
            .ctx(|| format!("hashing {}", path.display()))
            .map(|m| m.blocks().saturating_mul(512) < m.len())?;
        let mut hasher = blake3::Hasher::new();
        if sparse {
            hash_sparse(path, &mut hasher).ctx(|| format!("hashing {}", path.display()))?;
        } else {
            hasher
                .update_mmap_rayon(path)
                .ctx(|| format!("hashing {}", path.display()))?;
        }
        let size = hasher.count();
        Ok((Hash(*hasher.finalize().as_bytes()), size))
    }

    /// Blob files and staging files.
    pub fn blobs(&self) -> Blobs<'_> {
        Blobs { store: self }
    }
}

/// The store's files: staging files of writers, and blob files (one read-only file per
/// distinct content) with their install path, reads, deletion and verification. Blob states
/// and their transitions are `lifecycle`'s. A view over the store; `Store::blobs` gives one.
#[derive(Clone, Copy)]
pub struct Blobs<'s> {
    store: &'s Store,
}

impl Blobs<'_> {
    pub fn blob_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.store.root.join("blobs").join(&hex[..2]).join(hex)
    }

    /// A fresh private file for staging writes, opened read-write.
    pub fn new_staging(&self) -> Result<(File, PathBuf)> {
        self.create_staging(None)
    }

    /// A fresh, empty staging file already armed for inode `ino` (see `arm_staging`): an
    /// empty file is complete as a starting point, so it needs no copy and no rename.
    pub fn new_armed_staging(&self, ino: Ino) -> Result<(File, PathBuf)> {
        self.create_staging(Some(ino))
    }

    fn create_staging(&self, armed_for: Option<Ino>) -> Result<(File, PathBuf)> {
        let seq = self.store.staging_seq.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("{}-{seq}", std::process::id());
        if let Some(ino) = armed_for {
            name = crate::staged::armed_name(&name, ino, boot_id());
        }
        let path = self.store.root.join("staging").join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .ctx(|| format!("creating staging file {}", path.display()))?;
        Ok((file, path))
    }

    /// Marks a prepared staging file as holding inode `ino`'s content from now on, so that
    /// if the daemon dies before committing it, the next open of the store commits it (see
    /// `recover`). Called once the file is complete as a starting point (a copy of the
    /// committed content, or empty): a file caught half-way through that copy is never
    /// armed, and recovery deletes it. Returns the file's new path.
    pub fn arm_staging(&self, path: &Path, ino: Ino) -> Result<PathBuf> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or(Error::Invalid("staging file without a name"))?;
        let armed = path.with_file_name(crate::staged::armed_name(name, ino, boot_id()));
        fs::rename(path, &armed).ctx(|| format!("arming staging file {}", path.display()))?;
        Ok(armed)
    }

    /// Turns staged content into a blob (deduplicated) and points inode `ino` at it, in one
    /// transaction. Returns the hash and the size. The staging file is deleted only once
    /// that transaction is committed (a new blob is a hard link to it, so it can stay): at
    /// once when it committed on its own, else by the group's commit (`Store::settle_group`),
    /// so a crash before that still finds it armed and keeps its content, however long ago
    /// it was written. On an error it stays the caller's, to commit again.
    pub fn commit_staged(&self, st: &Staged<'_>) -> Result<(Hash, u64)> {
        // A halted store would refuse the transaction anyway: install nothing.
        self.store.check_running()?;
        // Before the index lock: a large file's fsync must not stall every other commit.
        if st.durable {
            self.store.faults.check(Step::SyncData)?;
            st.file
                .sync_data()
                .ctx(|| format!("syncing {}", st.path.display()))?;
        }
        let (hash, size) = match st.known {
            Some(k) => k,
            None => Store::hash_path(st.path)?,
        };
        let blob_path = self.blob_path(&hash);

        // A durable commit is a transaction of its own (after the open group), so its FULL
        // sync covers it and everything before it.
        let conn = if st.durable {
            self.store.conn_direct()?
        } else {
            self.store.conn()
        };
        let existing = lifecycle::row(&conn, &hash)?;
        // The blob file's allocation (st_blocks), recorded so getattr need not stat it: a
        // sparse staging file keeps its holes through the rename, and a duplicate takes the
        // allocation of the file already there.
        let mut blocks = None;
        let mut file_ino = existing.map(|e| e.file_ino).unwrap_or(0);
        let have_file = existing.is_some_and(|e| e.state.is_local())
            && fs::metadata(&blob_path).is_ok_and(|m| {
                blocks = Some(m.blocks() as i64);
                m.ino() as i64 == file_ino
            });
        let installed = !have_file;
        if have_file {
            // Deduplicated: the staged bytes are the caller's to delete; the file already
            // there is the one that must be durable.
            if st.durable {
                let f = File::open(&blob_path)
                    .ctx(|| format!("opening blob {}", blob_path.display()))?;
                self.sync_blob_file(&blob_path, &f)?;
            }
        } else {
            let (ino, b) = self.install_blob(st.path, st.file, &hash, st.durable, true)?;
            file_ino = ino;
            blocks = Some(b);
        }

        if st.durable {
            conn.pragma_update(None, "synchronous", "FULL")?;
        }
        let res = (|| -> Result<Vec<Hash>> {
            let tx = self.store.begin_tx(&conn)?;
            let old: Option<Option<Hash>> = tx
                .query_row(
                    "SELECT blob FROM inodes WHERE ino = ?1",
                    [st.ino as i64],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(old) = old else {
                return Err(Error::NotFound);
            };
            lifecycle::commit_ref(
                &tx,
                &hash,
                size,
                file_ino,
                self.store.next_access_seq(),
                blocks,
            )?;
            tx.prepare_cached("DELETE FROM dead_blobs WHERE hash = ?1")?
                .execute([&hash])?;
            tx.prepare_cached(
                "UPDATE inodes SET blob = ?2, size = ?3, mtime = ?4, ctime = max(ctime, ?4)
                 WHERE ino = ?1",
            )?
            .execute(params![st.ino as i64, &hash, size as i64, st.mtime])?;
            let mut dead = Vec::new();
            if let Some(h) = old {
                crate::ns::unref_blob(&tx, &h, &mut dead)?;
            }
            self.store.commit_tx(tx)?;
            Ok(dead)
        })();
        if st.durable {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let dead = match res {
            Ok(dead) => dead,
            Err(e) => {
                if installed {
                    // No row names the file just installed: take it out of `blobs/` again
                    // (else it would sit there until gc removed it as a stray); the writer's
                    // next close retries the commit from the same staging file.
                    self.uninstall_blob(&blob_path, st);
                }
                return Err(e);
            }
        };
        // Under the same lock as the commit: no newer content of this inode can be recorded
        // in between. Queued before dead blobs are removed, whose group commit then takes it.
        self.retire_locked(&conn, st.path.to_owned());
        self.remove_dead_blobs(&conn, &dead);
        Ok((hash, size))
    }

    /// Undoes `install_blob` of a commit whose transaction failed: the staging file is
    /// writable again and under its own (armed) name. The blob was a link to it, which goes;
    /// or, where the store's filesystem refused the link, the staging file itself renamed,
    /// which goes back: deleting it would delete the only copy of the content.
    fn uninstall_blob(&self, blob_path: &Path, st: &Staged<'_>) {
        let back = st
            .file
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| match fs::symlink_metadata(st.path) {
                Ok(_) => fs::remove_file(blob_path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::rename(blob_path, st.path)
                }
                Err(e) => Err(e),
            });
        if let Err(e) = back {
            tracing::error!(path = %blob_path.display(), error = %e, "taking uncommitted content out of blobs/ failed; it stays there until gc");
        }
    }

    /// Deletes staging file `path` once what made it unwanted has reached the database:
    /// now if no group is open, else right after the group commits (`Store::settle_group`).
    /// For staged content a change other than `commit_staged` settled (an empty file's
    /// content cleared, the last name of an unlinked file gone): until that change is
    /// committed, a crash leaves the file armed and the next start commits it again.
    pub fn retire_staging(&self, path: PathBuf) {
        let conn = self.store.conn.lock().unwrap_or_else(|p| p.into_inner());
        self.retire_locked(&conn, path);
    }

    /// `retire_staging` for a caller that holds the connection lock.
    fn retire_locked(&self, conn: &rusqlite::Connection, path: PathBuf) {
        if !conn.is_autocommit() {
            self.store
                .retired_staging
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(path);
            return;
        }
        match fs::remove_file(&path) {
            // Renamed into `blobs/` (a store without hard links).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "deleting a committed staging file failed")
            }
            Ok(()) => {}
        }
    }

    /// Moves a complete file into `blobs/` as blob `hash`: the one way a file becomes a blob
    /// file, for commits and downloads alike. The caller holds the connection lock (so no
    /// other install or deletion of the same blob interleaves) and records the result in the
    /// database after; until then a crash leaves a file no row names, which `gc` and
    /// `verify` remove. `durable`: the caller synced the data already (before taking the
    /// lock, as that can take long), and the rename reaches the disk here, so the database
    /// never says a blob is there that a power cut would take away. Returns the file's
    /// inode number and its allocation in 512-byte blocks.
    /// `keep_src`: the blob is a hard link to `src`, which stays (a staging file, deleted by
    /// `retire_staging` once the commit is in the database); else `src` is renamed.
    pub(crate) fn install_blob(
        &self,
        src: &Path,
        file: &File,
        hash: &Hash,
        durable: bool,
        keep_src: bool,
    ) -> Result<(i64, i64)> {
        let blob_path = self.blob_path(hash);
        let dir = blob_path.parent().expect("blob path has a parent");
        self.store.faults.check(Step::Seal)?;
        file.set_permissions(fs::Permissions::from_mode(0o444))
            .ctx(|| format!("sealing {}", src.display()))?;
        self.store.faults.check(Step::CreateDir)?;
        self.store.faults.check(Step::Rename)?;
        // The link or rename first: the fan-out directory is there for all but a store's
        // first few blobs, and looking for it on every commit showed in profiles.
        let place = |to: &Path| {
            if !keep_src {
                return fs::rename(src, to);
            }
            let linked = match self.store.faults.check(Step::Link) {
                Ok(()) => fs::hard_link(src, to),
                Err(e) => Err(std::io::Error::from_raw_os_error(e.errno())),
            };
            match linked {
                // A store on a filesystem without hard links: the staging file becomes the
                // blob by rename, as before links were used (a crash before the group commit
                // then loses this content, see docs/commit-protocol.md).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
                    fs::rename(src, to)
                }
                r => r,
            }
        };
        let placed = match place(&blob_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
                place(&blob_path)
            }
            // A file no row vouches for (a stray a crash left) is in the way of the link:
            // link beside it, then rename over it, as a rename would have replaced it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let side = dir.join(format!(".{}-{}", hash.to_hex(), std::process::id()));
                let _ = fs::remove_file(&side);
                place(&side).and_then(|()| fs::rename(&side, &blob_path))
            }
            r => r,
        };
        placed.ctx(|| format!("installing {} as blob {hash}", src.display()))?;
        if durable {
            self.store.faults.check(Step::SyncDir)?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .ctx(|| format!("syncing {}", dir.display()))?;
        }
        // The open file is the blob file now: fstat, no path lookup.
        let meta = file
            .metadata()
            .ctx(|| format!("stat of blob {}", blob_path.display()))?;
        Ok((meta.ino() as i64, meta.blocks() as i64))
    }

    /// Makes blob `hash`'s file and its name in `blobs/` durable (fsync of the file and of its
    /// fan-out directory), for an `fsync` of a file whose content was committed without one
    /// (at its last close). A blob with no local file has nothing to sync: its bytes are an
    /// upstream's.
    pub fn sync_blob(&self, hash: &Hash) -> Result<()> {
        let path = self.blob_path(hash);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = lifecycle::row(&self.store.conn(), hash)?.map(|r| r.state);
                if matches!(state, Some(BlobState::RemoteOnly)) {
                    return Ok(());
                }
                return Err(Error::BadBlob {
                    hash: *hash,
                    reason: format!("cannot open {}: {e}", path.display()),
                });
            }
            Err(e) => return Err(e).ctx(|| format!("opening blob {}", path.display())),
        };
        self.sync_blob_file(&path, &file)
    }

    /// Forces blob file `path` (open as `file`) and its `blobs/xx` entry to disk: the entry
    /// too, since a commit that did not ask for durability may have linked it there.
    fn sync_blob_file(&self, path: &Path, file: &File) -> Result<()> {
        self.store.faults.check(Step::SyncData)?;
        file.sync_all()
            .ctx(|| format!("syncing blob {}", path.display()))?;
        let dir = path.parent().expect("blob path has a parent");
        self.store.faults.check(Step::SyncDir)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing {}", dir.display()))
    }

    /// Makes a blob's bytes available locally and opens them read-only. This is the one read
    /// path into blob content: it checks the file is the one that was committed (size and
    /// inode number), so a blob replaced or truncated behind the daemon's back is refused.
    pub fn open_blob(&self, hash: &Hash) -> Result<File> {
        let row = lifecycle::row(&self.store.conn(), hash)?;
        let Some(lifecycle::BlobRow {
            size,
            state,
            file_ino,
        }) = row
        else {
            return Err(Error::BadBlob {
                hash: *hash,
                reason: "no blob record".into(),
            });
        };
        match state {
            BlobState::Local { .. } => {}
            BlobState::RemoteOnly => return Err(Error::NotLocal { hash: *hash }),
            BlobState::Quarantined { .. } => {
                return Err(Error::BadBlob {
                    hash: *hash,
                    reason: "quarantined after failing verification".into(),
                })
            }
        }
        let path = self.blob_path(hash);
        let file = File::open(&path).map_err(|e| Error::BadBlob {
            hash: *hash,
            reason: format!("cannot open {}: {e}", path.display()),
        })?;
        let meta = file.metadata().map_err(|e| Error::BadBlob {
            hash: *hash,
            reason: format!("cannot stat {}: {e}", path.display()),
        })?;
        if meta.len() != size {
            return Err(Error::BadBlob {
                hash: *hash,
                reason: format!("size is {} bytes, expected {size}", meta.len()),
            });
        }
        if file_ino != 0 && meta.ino() as i64 != file_ino {
            return Err(Error::BadBlob {
                hash: *hash,
                reason: "blob file was replaced behind the store's back".into(),
            });
        }
        Ok(file)
    }

    /// Deletes blob files whose rows went away in a committed transaction. Runs with the
    /// connection lock held so a concurrent commit of the same content cannot interleave.
    pub(crate) fn remove_dead_blobs(&self, conn: &rusqlite::Connection, dead: &[Hash]) {
        if dead.is_empty() {
            return;
        }
        // Under group commit the rows' removal must be committed before the files go, or a
        // crash would bring back rows whose files are gone. If it cannot be, the files stay
        // (gc removes them once nothing names them).
        if let Err(e) = self.store.settle_group(conn) {
            tracing::error!(error = %e, "committing before removing unreferenced blobs failed; keeping them");
            return;
        }
        for h in dead {
            let p = self.blob_path(h);
            if let Err(e) = self
                .store
                .faults
                .check(Step::Unlink)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
                .and_then(|()| fs::remove_file(&p))
            {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(hash = %h, error = %e, "could not remove unreferenced blob");
                    continue;
                }
            }
            let _ = conn
                .prepare_cached("DELETE FROM dead_blobs WHERE hash = ?1")
                .and_then(|mut s| s.execute([&h.0[..]]));
        }
    }

    /// Removes blob files of rows deleted earlier; returns how many there were.
    pub(crate) fn sweep_dead_blobs(&self) -> Result<u64> {
        let conn = self.store.conn();
        let dead: Vec<Hash> = {
            let mut stmt = conn.prepare(
                "SELECT d.hash FROM dead_blobs d WHERE NOT EXISTS
                 (SELECT 1 FROM blobs b WHERE b.hash = d.hash)",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, Hash>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        self.remove_dead_blobs(&conn, &dead);
        conn.prepare_cached("DELETE FROM dead_blobs")?.execute([])?;
        Ok(dead.len() as u64)
    }

    /// Rehashes every local blob; quarantines those whose content does not match their name,
    /// flags missing ones, removes blob files nothing records, and checks reference counts.
    pub fn verify(&self, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let blobs: Vec<(Hash, u64, BlobState)> = {
            let conn = self.store.conn();
            let mut stmt = conn.prepare("SELECT hash, size, state, remote FROM blobs")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, Hash>(0)?,
                    crate::codec::unsigned(r.get(1)?, "blobs.size")?,
                    BlobState::from_row(r, 2)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let total = blobs.len() as u64;
        let mut known = std::collections::HashSet::new();
        for (i, (hash, size, state)) in blobs.iter().enumerate() {
            progress(i as u64, total);
            known.insert(hash.to_hex());
            let path = self.blob_path(hash);
            match state {
                BlobState::RemoteOnly => continue,
                BlobState::Quarantined { .. } => {
                    report.quarantined.push(hash.to_hex());
                    continue;
                }
                BlobState::Local { .. } => {}
            }
            if !path.exists() {
                tracing::error!(hash = %hash, "blob file is missing");
                report.missing.push(hash.to_hex());
                lifecycle::quarantine(&self.store.conn(), hash)?;
                continue;
            }
            let (actual, actual_size) = Store::hash_path(&path)?;
            report.checked += 1;
            report.bytes += actual_size;
            if actual != *hash || actual_size != *size {
                tracing::error!(hash = %hash, actual = %actual, "blob content does not match its name; quarantined");
                let q = self.store.root.join("quarantine").join(hash.to_hex());
                fs::rename(&path, &q).ctx(|| format!("quarantining {}", path.display()))?;
                lifecycle::quarantine(&self.store.conn(), hash)?;
                report.quarantined.push(hash.to_hex());
            } else if let Ok(meta) = fs::metadata(&path) {
                // The content is right: adopt the file even if it was replaced by a copy, so
                // opens that refused it as "replaced behind the store's back" work again.
                self.store.conn().execute(
                    "UPDATE blobs SET file_ino = ?2, blocks = ?3 WHERE hash = ?1",
                    params![&hash.0[..], meta.ino() as i64, meta.blocks() as i64],
                )?;
            }
        }
        // Blob files with no row are left from a crash between commit and unlink.
        let blobs_dir = self.store.root.join("blobs");
        for sub in fs::read_dir(&blobs_dir).ctx(|| format!("reading {}", blobs_dir.display()))? {
            let sub = sub.ctx(|| format!("reading {}", blobs_dir.display()))?;
            let Ok(entries) = fs::read_dir(sub.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    let _ = fs::remove_file(e.path());
                    report.stray_removed += 1;
                }
            }
        }
        let conn = self.store.conn();
        report.bad_refcounts = conn.query_row(
            "SELECT count(*) FROM blobs b WHERE b.refs !=
               (SELECT count(*) FROM inodes i WHERE i.blob = b.hash)",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64;
        progress(total, total);
        Ok(report)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, without dashes): staged content from
/// this boot survived in the page cache when the daemon died; from an earlier boot it may
/// not have reached the disk whole, so it is not kept. Empty when it cannot be read (then
/// nothing is kept).
pub(crate) fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().replace('-', ""))
            .unwrap_or_default()
    })
}
