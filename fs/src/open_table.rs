//! The open table: the handles the kernel holds (by fh) and the per-inode state shared by
//! every handle of an open inode (counts, staging file, passthrough registration), with the
//! rules for when that state is made and dropped.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kcache_store::{Hash, Ino, Inode, Lease, Staged, Store, StreamHasher};

use crate::access::Access;
use crate::core::lock;
use crate::error::{Errno, Result};
use crate::staging::Staging;
use crate::types::mtime_of;
use crate::types::{Backing, BackingToken, IoMode};

pub(crate) struct PtState {
    pub(crate) token: BackingToken,
    pub(crate) handles: u32,
    /// The blob the backing file holds: once the inode's content has moved on (a truncate
    /// by path committed meanwhile), new opens wait for these handles to go rather than
    /// join them and read the old content.
    pub(crate) hash: Hash,
}

/// Per-inode state while any handle is open or staged content is uncommitted.
#[derive(Default)]
pub(crate) struct OpenInode {
    pub(crate) handles: u32,
    pub(crate) writers: u32,
    pub(crate) cached_handles: u32,
    /// Handles without page cache (readers while the file is written). They would not stop
    /// a passthrough open in the kernel, but their open answers may still be on the way
    /// there: one arriving after a passthrough open it raced with would fail (EIO), so no
    /// passthrough while any is open.
    pub(crate) direct_handles: u32,
    /// Writable handles among `direct_handles`. While there are any, every new handle is
    /// direct too: no handle of this inode uses the page cache, which the direct writes
    /// would leave stale.
    pub(crate) direct_writers: u32,
    /// `security.capability` is known gone since the first direct write of this open state
    /// (a direct write must remove it as the kernel's cached write path would; see
    /// `KcacheFs::write`), or since the create of a new file without one. Cleared when it is
    /// set again.
    pub(crate) capability_gone: bool,
    pub(crate) staging: Option<Staging>,
    pub(crate) pt: Option<PtState>,
    /// The committed blob, open for reads served by the daemon.
    pub(crate) blob_file: Option<(Hash, Arc<File>)>,
    /// Removed from the table of open inodes; whoever still holds it must look again.
    pub(crate) dead: bool,
    /// Opens for writing waiting for the passthrough readers to close (see `KcacheFs::open_gated`):
    /// while there are any, new readers wait too instead of joining (and prolonging) the
    /// passthrough, and once it is gone they do not start a new one.
    pub(crate) writers_waiting: u32,
    /// `Store::inode_changes` as read just before the last open found this inode linked:
    /// while the store still says the same, no inode row changed since, so the inode is
    /// still linked and its last close need not read its row to see whether it is purged.
    pub(crate) linked_as_of: Option<u64>,
}

impl OpenInode {
    /// Nothing needs this state any more: no handle, nothing staged, no writer waiting.
    fn unused(&self) -> bool {
        self.handles == 0 && self.staging.is_none() && self.writers_waiting == 0 && !self.dead
    }

    /// Counts a new handle of this inode (`inode`, read under this state's lock) and decides
    /// how the kernel does its I/O; with O_TRUNC (`access.trunc`), empties the staged content
    /// first.
    /// `streaming`: reads go through a download under way. Fails with
    /// `Errno::PASSTHROUGH_HELD` while passthrough handles keep this open out (see `KcacheFs::open_gated`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open_handle(
        &mut self,
        store: &Store,
        page_cache: &PageCache,
        passthrough: &AtomicBool,
        inode: &Inode,
        access: Access,
        backing: Option<&dyn Backing>,
        streaming: bool,
    ) -> Result<IoMode> {
        let Access {
            writable,
            write_only,
            trunc,
        } = access;
        // The kernel refuses any handle but a passthrough one on an inode that has
        // passthrough handles open; a writer must wait for them to close (see `KcacheFs::open_gated`).
        if self.pt.as_ref().is_some_and(|pt| {
            writable
                || self.writers_waiting > 0
                || inode.blob != Some(pt.hash)
                || self.staging.is_some()
        }) {
            return Err(Errno::PASSTHROUGH_HELD);
        }
        if trunc {
            // O_TRUNC on an existing file updates its mtime and ctime, even if it was empty.
            let now = kcache_store::now_ns();
            match &mut self.staging {
                Some(st) => st.reset(now)?,
                None => self.staging = Some(Staging::new(&store.blobs(), inode.ino, None, now)?),
            }
            if let Some(st) = &mut self.staging {
                st.dirty = true;
            }
        }

        // Decide the I/O mode. Passthrough is only for committed content that nobody writes:
        // writes must reach the daemon so that it knows exactly what changed and never lets a
        // write land in a file that has become a blob. The kernel requires all passthrough
        // handles of an inode to share one backing file and admits no other kind of handle
        // while there are any, so readers join them and writers wait (checked above).
        let quiet =
            !writable && self.writers == 0 && self.staging.is_none() && self.writers_waiting == 0;
        let mode = match (
            &mut self.pt,
            backing.filter(|_| passthrough.load(Ordering::Relaxed) && !streaming),
        ) {
            // Readers join passthrough readers (the only handle the kernel lets in), even
            // when a truncate by path has staged new content meanwhile: they then see the
            // content they would have seen had they opened a moment earlier.
            (Some(pt), _) => {
                pt.handles += 1;
                IoMode::Passthrough(pt.token.clone())
            }
            (None, Some(b))
                if quiet
                    && self.cached_handles == 0
                    && self.direct_handles == 0
                    && inode.blob.is_some() =>
            {
                let file = self.blob_file(store, inode.blob.expect("checked above"))?;
                match b.register(&file) {
                    Ok(token) => {
                        self.pt = Some(PtState {
                            token: token.clone(),
                            handles: 1,
                            hash: inode.blob.expect("checked above"),
                        });
                        IoMode::Passthrough(token)
                    }
                    Err(e) => {
                        tracing::warn!(ino = inode.ino, error = %e, "passthrough refused; serving this file from the daemon");
                        self.cached_handles += 1;
                        IoMode::Cached { keep_cache: false }
                    }
                }
            }
            // A writer that cannot read (O_WRONLY) writes past the page cache when no handle
            // uses it: a write through the page cache costs a second copy of every byte (the
            // inode's pages and the staging file's), which doubled the memory and time of
            // large writes. Readers and writers joining a direct writer are direct too (so no
            // page is left stale by its writes), as are readers while the file is written.
            (None, _)
                if writable
                    && (self.direct_writers > 0 || (write_only && self.cached_handles == 0)) =>
            {
                // The first direct writer has the kernel drop the inode's pages: nothing uses
                // them now (no cached handle is open), and a page kept from before its writes
                // would be stale to a direct reader's mmap later.
                let keep_cache = self.direct_writers > 0;
                if !keep_cache {
                    page_cache.forget(inode.ino);
                }
                self.direct_handles += 1;
                self.direct_writers += 1;
                IoMode::Direct { keep_cache }
            }
            // A reader while the file is being written: no page cache. A cached open would
            // drop the inode's pages (keep_cache off), and a page read back from the daemon
            // before a write already copied into the dropped page reaches it would be cached
            // short, zero-filled up to the size the write's answer then sets: a torn read.
            (None, _) if !writable && (self.writers > 0 || self.staging.is_some()) => {
                self.direct_handles += 1;
                IoMode::Direct { keep_cache: true }
            }
            (None, _) => {
                self.cached_handles += 1;
                let keep_cache = match (&self.staging, inode.blob) {
                    (None, Some(h)) if self.writers == 0 && !streaming => {
                        page_cache.keep(inode.ino, h)
                    }
                    // A writer joining one already writing: the kernel's pages are the staged
                    // content (every write and truncate goes through them), and dropping them
                    // now could lose a write still on its way to the daemon, as above.
                    // (Not an O_TRUNC open: its content starts empty.)
                    _ if (self.writers > 0 || self.staging.is_some()) && !streaming && !trunc => {
                        page_cache.forget(inode.ino);
                        true
                    }
                    _ => {
                        page_cache.forget(inode.ino);
                        false
                    }
                };
                IoMode::Cached { keep_cache }
            }
        };
        self.handles += 1;
        if writable {
            self.writers += 1;
        }
        if let Some(h) = inode.blob {
            // Every open counts for the LRU; noted in memory, written in batches.
            store.lru().note_access(h);
        }
        Ok(mode)
    }

    /// The staging file of this open inode (`ino`), made from the committed content on first
    /// use, and marked dirty: the caller is about to change it.
    pub(crate) fn staging_mut(&mut self, store: &Store, ino: Ino) -> Result<&mut Staging> {
        if self.staging.is_none() {
            let inode = store.ns().get(ino)?;
            self.staging = Some(Staging::new(&store.blobs(), ino, inode.blob, inode.mtime)?);
        }
        let st = self.staging.as_mut().expect("just made");
        st.dirty = true;
        Ok(st)
    }

    /// Like `staging_mut` for a change other than an in-order write: the streamed hash no
    /// longer describes the content.
    pub(crate) fn staging_for_write(&mut self, store: &Store, ino: Ino) -> Result<Arc<File>> {
        let st = self.staging_mut(store, ino)?;
        st.stream = None;
        Ok(st.file.clone())
    }

    /// The open committed blob for daemon-served reads, opened through the store's one
    /// "make local" path.
    pub(crate) fn blob_file(&mut self, store: &Store, h: Hash) -> Result<Arc<File>> {
        if let Some((bh, f)) = &self.blob_file {
            if *bh == h {
                return Ok(f.clone());
            }
        }
        let f = Arc::new(store.blobs().open_blob(&h)?);
        self.blob_file = Some((h, f.clone()));
        Ok(f)
    }

    /// Hashes the staged content and points the inode at the resulting blob, then lets go of
    /// the staging file (deleted once the commit is in the database, by `commit_staged`, or
    /// by `retire_staging` for content cleared to empty): the blob is a link to it, or the
    /// content was already stored.
    /// The next write makes a fresh staging file. Nothing else can be writing it: writes take
    /// the inode lock the caller holds (on this state), and the kernel never writes staging
    /// files directly.
    pub(crate) fn commit(
        &mut self,
        store: &Store,
        ino: Ino,
        durable: bool,
        commits: &AtomicU64,
        page_cache: &PageCache,
    ) -> Result<()> {
        let Some(st) = &self.staging else {
            return Ok(());
        };
        if store.ns().links(ino)?.1 == 0 {
            // Unlinked while open: the content dies with the last handle. An fsync still
            // makes what it covers durable, the unlink included (as ext4's journal commit).
            if durable {
                store.sync()?;
            }
            return Ok(());
        }
        let meta = st.file.metadata()?;
        // Handles still open after this commit read the new blob. They read it through a
        // read-only descriptor of the staged file (the same bytes: the blob is a link to it,
        // or an existing file with the same hash), opened now, so they need not open the blob
        // by path later. That open could fail then (the store's directory removed under a
        // lazily detached mount, a full file table) and turn a read of committed bytes into
        // EIO. Failing it here costs nothing: the blob is opened when first read, as before.
        let reader = (self.handles > 0)
            .then(|| File::open(&st.path).ok())
            .flatten();
        let mut blob = None;
        if meta.len() == 0 {
            store.ns().clear_content(ino, mtime_of(&meta))?;
            // No blob carries this commit to the disk: the database sync must (SQLite's
            // rollback journal is committed by truncating it to nothing and fsyncing).
            if durable {
                store.sync()?;
            }
        } else {
            let known = st
                .stream
                .as_ref()
                .map(StreamHasher::finish)
                .filter(|k| k.1 == meta.len());
            let staged = Staged {
                ino,
                path: &st.path,
                file: &st.file,
                known,
                durable,
                mtime: mtime_of(&meta),
            };
            blob = Some(store.blobs().commit_staged(&staged)?.0);
        }
        // Counted while this inode's lock is held, before the file can leave the open table.
        commits.fetch_add(1, Ordering::SeqCst);
        self.blob_file = blob.zip(reader).map(|(h, f)| (h, Arc::new(f)));
        if let Some(st) = self.staging.take() {
            if blob.is_none() {
                // Deleted once the cleared content is in the database: until then a crash
                // finds it armed and keeps its content (`commit_staged` does the same for
                // the files it commits).
                store.blobs().retire_staging(st.path);
            }
        }
        page_cache.forget(ino);
        Ok(())
    }

    /// After the last handle closed: the blob file goes, and so does staged content that
    /// nobody will commit (unchanged, or its file has no name left).
    pub(crate) fn last_handle_closed(&mut self, store: &Store, ino: Ino) {
        self.blob_file = None;
        let Some(st) = &self.staging else {
            // Nothing staged (the usual case: the close just committed it).
            return;
        };
        // Dirty content goes only with its last name. A row that cannot be read says
        // nothing: keep the staged bytes (the next close or the unmount commits them).
        let unwanted = !st.dirty
            || match store.ns().links(ino) {
                Ok((_, nlink)) => nlink == 0,
                Err(kcache_store::Error::NotFound) => true,
                Err(e) => {
                    tracing::error!(ino, error = %e, "reading a closed file's row failed; its staged content is kept");
                    false
                }
            };
        if unwanted {
            if let Some(st) = self.staging.take() {
                // Not before the unlink that made it unwanted is committed: if a crash lost
                // that unlink, the name is back, and must come back with what was written.
                store.blobs().retire_staging(st.path);
            }
        }
    }

    /// Takes released handle `h` off the counts (and the passthrough registration with its
    /// last passthrough handle).
    pub(crate) fn drop_handle(&mut self, h: &Handle) {
        self.handles -= 1;
        if h.writable {
            self.writers -= 1;
        }
        match h.mode_kind {
            ModeKind::Passthrough => {
                if let Some(pt) = &mut self.pt {
                    pt.handles -= 1;
                    if pt.handles == 0 {
                        self.pt = None;
                    }
                }
            }
            ModeKind::Cached => self.cached_handles -= 1,
            ModeKind::Direct => {
                self.direct_handles = self.direct_handles.saturating_sub(1);
                if h.writable {
                    self.direct_writers = self.direct_writers.saturating_sub(1);
                }
            }
        }
    }
}

pub(crate) struct Handle {
    pub(crate) ino: Ino,
    pub(crate) writable: bool,
    pub(crate) mode_kind: ModeKind,
    /// The download this read-only handle reads through while its content arrives. Held
    /// here, so the last handle's release cancels a download nobody else wants.
    pub(crate) lease: Option<Arc<Lease>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ModeKind {
    Passthrough,
    Cached,
    Direct,
}

impl ModeKind {
    pub(crate) fn of(mode: &IoMode) -> ModeKind {
        match mode {
            IoMode::Passthrough(_) => ModeKind::Passthrough,
            IoMode::Cached { .. } => ModeKind::Cached,
            IoMode::Direct { .. } => ModeKind::Direct,
        }
    }
}

/// Blob whose pages the kernel may still cache for an inode, to set keep_cache on reopen.
#[derive(Default)]
pub(crate) struct PageCache(Mutex<HashMap<Ino, Hash>>);

impl PageCache {
    /// Notes that the kernel caches blob `h`'s pages for `ino` from now on. True when it
    /// already did: pages from an earlier open of the same content may be kept.
    pub(crate) fn keep(&self, ino: Ino, h: Hash) -> bool {
        lock(&self.0).insert(ino, h) == Some(h)
    }

    /// The kernel's pages of `ino` are gone, or no longer the content.
    pub(crate) fn forget(&self, ino: Ino) {
        lock(&self.0).remove(&ino);
    }
}

type OpenMap = HashMap<Ino, Arc<Mutex<OpenInode>>>;

/// The handles of one filesystem and the state of its open inodes. Lock order: the map of
/// open inodes before an inode's own lock, never the other way round.
pub(crate) struct OpenTable {
    next_fh: AtomicU64,
    open: Mutex<OpenMap>,
    handles: Mutex<HashMap<u64, Handle>>,
}

impl Default for OpenTable {
    fn default() -> OpenTable {
        OpenTable {
            next_fh: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
        }
    }
}

impl OpenTable {
    // ---- handles ---------------------------------------------------------------------

    /// A new file handle number, never given before by this table.
    pub(crate) fn next_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn insert_handle(&self, fh: u64, h: Handle) {
        lock(&self.handles).insert(fh, h);
    }

    /// The inode behind handle `fh`, and whether the handle may write.
    pub(crate) fn handle_ino(&self, fh: u64) -> Option<(Ino, bool)> {
        lock(&self.handles).get(&fh).map(|h| (h.ino, h.writable))
    }

    /// The inode behind handle `fh`, whether it may write, and how it does its I/O.
    pub(crate) fn handle_mode(&self, fh: u64) -> Option<(Ino, bool, ModeKind)> {
        lock(&self.handles)
            .get(&fh)
            .map(|h| (h.ino, h.writable, h.mode_kind))
    }

    /// The inode behind handle `fh`, and the download it reads through, if any.
    pub(crate) fn handle_lease(&self, fh: u64) -> Option<(Ino, Option<Arc<Lease>>)> {
        lock(&self.handles)
            .get(&fh)
            .map(|h| (h.ino, h.lease.clone()))
    }

    pub(crate) fn remove_handle(&self, fh: u64) -> Option<Handle> {
        lock(&self.handles).remove(&fh)
    }

    // ---- open inodes -----------------------------------------------------------------

    /// The map of open inodes, locked, for a caller that must hold it across another step.
    pub(crate) fn inodes(&self) -> MutexGuard<'_, OpenMap> {
        lock(&self.open)
    }

    /// The state of `ino` if it is open.
    pub(crate) fn get(&self, ino: Ino) -> Option<Arc<Mutex<OpenInode>>> {
        lock(&self.open).get(&ino).cloned()
    }

    pub(crate) fn contains(&self, ino: Ino) -> bool {
        lock(&self.open).contains_key(&ino)
    }

    /// The inodes open now.
    pub(crate) fn inos(&self) -> Vec<Ino> {
        lock(&self.open).keys().copied().collect()
    }

    /// Every open inode with its state.
    pub(crate) fn all(&self) -> Vec<(Ino, Arc<Mutex<OpenInode>>)> {
        lock(&self.open)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Runs `f` on the live per-inode state of `ino` (created if needed) with its lock held,
    /// then drops the state again if `f` left nothing in it. Retries when it raced with
    /// another caller dropping the entry it found.
    pub(crate) fn with_inode<R>(&self, ino: Ino, f: impl FnOnce(&mut OpenInode) -> R) -> R {
        loop {
            let oi = lock(&self.open).entry(ino).or_default().clone();
            let mut g = lock(&oi);
            if g.dead {
                continue;
            }
            let r = f(&mut g);
            drop(g);
            self.release_inode(ino, &oi);
            return r;
        }
    }

    /// Drops the per-inode state if nothing uses it any more.
    pub(crate) fn release_inode(&self, ino: Ino, oi: &Arc<Mutex<OpenInode>>) {
        let mut open = lock(&self.open);
        let mut g = lock(oi);
        if g.unused() {
            g.dead = true;
            drop(g);
            if open.get(&ino).is_some_and(|cur| Arc::ptr_eq(cur, oi)) {
                open.remove(&ino);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::FileExt;

    fn handle(ino: Ino, writable: bool, mode_kind: ModeKind) -> Handle {
        Handle {
            ino,
            writable,
            mode_kind,
            lease: None,
        }
    }

    #[test]
    fn file_handles_are_unique_across_threads() {
        let t = Arc::new(OpenTable::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..1000).map(|_| t.next_fh()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = HashSet::new();
        for th in threads {
            for fh in th.join().unwrap() {
                assert!(fh != 0, "fh 0 is never given");
                assert!(seen.insert(fh), "fh {fh} given twice");
            }
        }
        assert_eq!(seen.len(), 4000);
    }

    #[test]
    fn handles_insert_look_up_and_remove() {
        let t = OpenTable::default();
        let fh = t.next_fh();
        assert_eq!(t.handle_ino(fh), None);
        t.insert_handle(fh, handle(7, true, ModeKind::Cached));
        assert_eq!(t.handle_ino(fh), Some((7, true)));
        let (ino, lease) = t.handle_lease(fh).unwrap();
        assert_eq!(ino, 7);
        assert!(lease.is_none());
        let h = t.remove_handle(fh).unwrap();
        assert_eq!(
            (h.ino, h.writable, h.mode_kind),
            (7, true, ModeKind::Cached)
        );
        assert!(t.remove_handle(fh).is_none());
        assert_eq!(t.handle_ino(fh), None);
        assert!(t.handle_lease(fh).is_none());
    }

    #[test]
    fn inode_state_lives_from_first_open_to_last_release() {
        let t = OpenTable::default();
        assert!(!t.contains(3));
        // Left with nothing in it, the state goes at once.
        t.with_inode(3, |g| assert_eq!(g.handles, 0));
        assert!(!t.contains(3));
        assert!(t.get(3).is_none());

        // Two opens.
        let hs = [
            handle(3, false, ModeKind::Cached),
            handle(3, true, ModeKind::Direct),
        ];
        for h in &hs {
            t.with_inode(3, |g| {
                g.handles += 1;
                if h.writable {
                    g.writers += 1;
                }
                if h.mode_kind == ModeKind::Cached {
                    g.cached_handles += 1;
                }
            });
        }
        assert!(t.contains(3));
        assert_eq!(t.inos(), vec![3]);
        let oi = t.get(3).unwrap();
        {
            let g = lock(&oi);
            assert_eq!((g.handles, g.writers, g.cached_handles), (2, 1, 1));
        }

        // First release: still open.
        lock(&oi).drop_handle(&hs[0]);
        t.release_inode(3, &oi);
        assert!(t.contains(3));
        assert!(!lock(&oi).dead);

        // Last release: dropped, and marked so that a holder of the old state looks again.
        lock(&oi).drop_handle(&hs[1]);
        t.release_inode(3, &oi);
        assert!(!t.contains(3));
        assert!(lock(&oi).dead);
        assert!(t.all().is_empty());

        // The next open makes a fresh state rather than reviving the dead one.
        t.with_inode(3, |g| {
            assert!(!g.dead);
            g.handles += 1;
        });
        let fresh = t.get(3).unwrap();
        assert!(!Arc::ptr_eq(&fresh, &oi));
    }

    #[test]
    fn a_waiting_writer_keeps_the_state() {
        let t = OpenTable::default();
        t.with_inode(4, |g| g.writers_waiting += 1);
        assert!(t.contains(4));
        t.with_inode(4, |g| g.writers_waiting -= 1);
        assert!(!t.contains(4));
    }

    #[test]
    fn releasing_a_stale_state_leaves_the_current_one() {
        let t = OpenTable::default();
        let stale: Arc<Mutex<OpenInode>> = Arc::default();
        t.with_inode(5, |g| g.handles += 1);
        t.release_inode(5, &stale);
        assert!(lock(&stale).dead);
        assert!(t.contains(5));
    }

    #[test]
    fn the_last_passthrough_handle_drops_the_registration() {
        let mut g = OpenInode {
            handles: 3,
            writers: 0,
            cached_handles: 1,
            pt: Some(PtState {
                token: Arc::new(()),
                handles: 2,
                hash: Hash([0; 32]),
            }),
            ..Default::default()
        };
        let pt = handle(1, false, ModeKind::Passthrough);
        g.drop_handle(&pt);
        assert_eq!(g.pt.as_ref().map(|p| p.handles), Some(1));
        g.drop_handle(&pt);
        assert!(g.pt.is_none());
        g.drop_handle(&handle(1, false, ModeKind::Cached));
        assert_eq!((g.handles, g.cached_handles), (0, 0));
    }

    struct Registers(bool);

    impl Backing for Registers {
        fn register(&self, _file: &File) -> std::io::Result<BackingToken> {
            if self.0 {
                Ok(Arc::new(()))
            } else {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            }
        }
    }

    /// A store holding one committed file with `data`, and its row.
    fn store_with_file(data: &[u8]) -> (tempfile::TempDir, Arc<Store>, Inode) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let vol = store.volume("default", true, 0, 0).unwrap();
        let fs = crate::KcacheFs::new(store.clone(), vol, false);
        let flags = libc::O_WRONLY | libc::O_CREAT;
        let name = std::ffi::OsStr::new("f");
        let (attr, o) = fs
            .create(
                crate::ROOT_INO,
                name,
                0o644,
                flags,
                crate::Ctx::root(),
                false,
                None,
            )
            .unwrap();
        fs.write(o.fh, 0, data).unwrap();
        fs.release(o.fh).unwrap();
        let inode = store.ns().get(attr.ino).unwrap();
        assert!(inode.blob.is_some());
        (dir, store, inode)
    }

    /// Opens a handle on `g` without O_TRUNC, reads going to the committed content; a
    /// writer opens O_RDWR.
    fn open(
        g: &mut OpenInode,
        store: &Store,
        pc: &PageCache,
        pt: &AtomicBool,
        inode: &Inode,
        writable: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<IoMode> {
        let flags = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        g.open_handle(
            store,
            pc,
            pt,
            inode,
            Access::from_flags(flags),
            backing,
            false,
        )
    }

    #[test]
    fn readers_reopening_unchanged_content_keep_the_page_cache() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let (pc, off) = (PageCache::default(), AtomicBool::new(false));
        let mut g = OpenInode::default();
        let m = open(&mut g, &store, &pc, &off, &inode, false, None).unwrap();
        assert!(matches!(m, IoMode::Cached { keep_cache: false }));
        let m = open(&mut g, &store, &pc, &off, &inode, false, None).unwrap();
        assert!(matches!(m, IoMode::Cached { keep_cache: true }));
        assert_eq!((g.handles, g.writers, g.cached_handles), (2, 0, 2));
        // A writer joins with the pages kept. While it has the file open, new readers get no
        // page cache (direct), and a second writer keeps the pages its writes go through.
        let m = open(&mut g, &store, &pc, &off, &inode, true, None).unwrap();
        assert!(matches!(m, IoMode::Cached { keep_cache: true }));
        let m = open(&mut g, &store, &pc, &off, &inode, false, None).unwrap();
        assert!(matches!(m, IoMode::Direct { .. }));
        assert_eq!(g.direct_handles, 1);
        let m = open(&mut g, &store, &pc, &off, &inode, true, None).unwrap();
        assert!(matches!(m, IoMode::Cached { keep_cache: true }));
        assert_eq!((g.handles, g.writers), (5, 2));
    }

    #[test]
    fn write_only_handles_skip_the_page_cache_unless_a_cached_handle_is_open() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let (pc, off) = (PageCache::default(), AtomicBool::new(false));
        let wo = Access::from_flags(libc::O_WRONLY);
        let rw = Access::from_flags(libc::O_RDWR);
        let open_as = |g: &mut OpenInode, a: Access| {
            g.open_handle(&store, &pc, &off, &inode, a, None, false)
                .unwrap()
        };
        // Alone, an O_WRONLY writer is direct, and so is everything that joins it: readers,
        // O_RDWR writers, more O_WRONLY writers. No handle uses the page cache meanwhile.
        let mut g = OpenInode::default();
        // The first drops the kernel's pages of the inode, the others keep them.
        assert!(matches!(
            open_as(&mut g, wo),
            IoMode::Direct { keep_cache: false }
        ));
        for a in [Access::READ, rw, wo] {
            assert!(matches!(
                open_as(&mut g, a),
                IoMode::Direct { keep_cache: true }
            ));
        }
        assert_eq!(
            (
                g.handles,
                g.writers,
                g.direct_handles,
                g.direct_writers,
                g.cached_handles
            ),
            (4, 3, 4, 3, 0)
        );
        // The direct writers gone, a new O_RDWR writer may use the page cache again (the
        // remaining direct reader never did).
        for _ in 0..3 {
            g.drop_handle(&handle(inode.ino, true, ModeKind::Direct));
        }
        assert_eq!((g.direct_handles, g.direct_writers), (1, 0));
        assert!(matches!(open_as(&mut g, rw), IoMode::Cached { .. }));

        // With a cached handle open (its pages in use), an O_WRONLY writer goes through the
        // page cache like any writer, so those pages see its writes.
        let mut g = OpenInode::default();
        assert!(matches!(
            open_as(&mut g, Access::READ),
            IoMode::Cached { .. }
        ));
        assert!(matches!(open_as(&mut g, wo), IoMode::Cached { .. }));
        assert_eq!(g.direct_writers, 0);
    }

    #[test]
    fn passthrough_readers_share_one_registration_and_keep_writers_out() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let (pc, on) = (PageCache::default(), AtomicBool::new(true));
        let yes = Registers(true);
        let mut g = OpenInode::default();
        for n in 1..=2 {
            let m = open(&mut g, &store, &pc, &on, &inode, false, Some(&yes)).unwrap();
            assert!(matches!(m, IoMode::Passthrough(_)));
            assert_eq!(g.pt.as_ref().map(|p| p.handles), Some(n));
        }
        assert!(g.blob_file.is_some());
        let e = open(&mut g, &store, &pc, &on, &inode, true, Some(&yes)).unwrap_err();
        assert_eq!(e, Errno::PASSTHROUGH_HELD);
        // Refused before anything was counted.
        assert_eq!((g.handles, g.writers, g.cached_handles), (2, 0, 0));

        // Passthrough switched off, or no backing: served by the daemon.
        let mut g = OpenInode::default();
        let off = AtomicBool::new(false);
        let m = open(&mut g, &store, &pc, &off, &inode, false, Some(&yes)).unwrap();
        assert!(matches!(m, IoMode::Cached { .. }));
    }

    #[test]
    fn a_refused_registration_serves_the_file_from_the_daemon() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let (pc, on) = (PageCache::default(), AtomicBool::new(true));
        let mut g = OpenInode::default();
        let m = open(
            &mut g,
            &store,
            &pc,
            &on,
            &inode,
            false,
            Some(&Registers(false)),
        )
        .unwrap();
        assert!(matches!(m, IoMode::Cached { keep_cache: false }));
        assert!(g.pt.is_none());
        assert_eq!((g.handles, g.cached_handles), (1, 1));
    }

    #[test]
    fn o_trunc_stages_empty_content_and_commit_stores_it() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let (pc, off) = (PageCache::default(), AtomicBool::new(false));
        let commits = AtomicU64::new(0);
        let mut g = OpenInode::default();
        let m = g
            .open_handle(
                &store,
                &pc,
                &off,
                &inode,
                Access::from_flags(libc::O_RDWR | libc::O_TRUNC),
                None,
                false,
            )
            .unwrap();
        assert!(matches!(m, IoMode::Cached { keep_cache: false }));
        let st = g.staging.as_ref().unwrap();
        assert!(st.dirty);
        assert_eq!(st.len().unwrap(), 0);
        let path = st.path.clone();

        g.staging_for_write(&store, inode.ino)
            .unwrap()
            .write_all_at(b"new", 0)
            .unwrap();
        g.commit(&store, inode.ino, false, &commits, &pc).unwrap();
        assert!(g.staging.is_none());
        assert_eq!(commits.load(Ordering::SeqCst), 1);
        let row = store.ns().get(inode.ino).unwrap();
        assert_eq!(row.size, 3);
        assert_ne!(row.blob, inode.blob);
        // New content: the blob is a link to the staging file, and the handle still open
        // reads it through a read-only descriptor opened before the commit.
        let (h, f) = g
            .blob_file
            .as_ref()
            .expect("the staging file is kept as the blob file");
        assert_eq!(Some(*h), row.blob);
        let mut buf = [0u8; 8];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 3);
        assert_eq!(&buf[..3], b"new");
        assert!(
            f.write_at(b"x", 0).is_err(),
            "the blob file is open for writing"
        );
        // No group is open here: the commit is in, and the staging file went with it.
        assert!(!path.exists());

        // Nothing staged: nothing to commit, and nothing counted.
        g.commit(&store, inode.ino, false, &commits, &pc).unwrap();
        assert_eq!(commits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn staging_is_made_from_the_committed_content_on_first_change() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let mut g = OpenInode::default();
        let st = g.staging_mut(&store, inode.ino).unwrap();
        assert!(st.dirty);
        let mut buf = [0u8; 5];
        st.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(st.stream.is_none(), "a copy is not streamed");
        // The blob file is opened once and reused.
        let h = inode.blob.unwrap();
        let a = g.blob_file(&store, h).unwrap();
        let b = g.blob_file(&store, h).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn the_last_close_drops_unchanged_staging_and_keeps_changed_content_of_a_named_file() {
        let (_dir, store, inode) = store_with_file(b"hello");
        let mut g = OpenInode::default();
        let st = Staging::new(&store.blobs(), inode.ino, inode.blob, inode.mtime).unwrap();
        let path = st.path.clone();
        g.staging = Some(st);
        g.last_handle_closed(&store, inode.ino);
        assert!(g.staging.is_none());
        assert!(!path.exists());

        g.staging_mut(&store, inode.ino).unwrap();
        g.blob_file(&store, inode.blob.unwrap()).unwrap();
        g.last_handle_closed(&store, inode.ino);
        assert!(
            g.staging.is_some(),
            "dirty content of a named file waits for its commit"
        );
        assert!(g.blob_file.is_none());
    }

    #[test]
    fn mode_kind_follows_the_io_mode() {
        assert_eq!(
            ModeKind::of(&IoMode::Passthrough(Arc::new(()))),
            ModeKind::Passthrough
        );
        assert_eq!(
            ModeKind::of(&IoMode::Cached { keep_cache: false }),
            ModeKind::Cached
        );
        assert_eq!(
            ModeKind::of(&IoMode::Direct { keep_cache: true }),
            ModeKind::Direct
        );
    }
}
