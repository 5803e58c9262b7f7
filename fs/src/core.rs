//! The filesystem logic, in plain Rust: no FUSE types, so it is tested without a mount.
//!
//! Inode numbers are the store's, except that the volume root is presented as inode 1.
//! Content lives in blobs; a file opened for writing gets a private staging file that every
//! handle of that inode uses until the last writer releases it, when the content is hashed and
//! committed into the store in one transaction (see `release`).
//!
//! `KcacheFs` composes the parts that need no filesystem around them: the value types the
//! kernel side sees (`types`), name checks, inode translation and lookup counts (`names`),
//! the handles and per-inode open state (`open_table`), and staging files (`staging`). This
//! file keeps the operations, which take the locks in the order those parts document.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kcache_store::{
    Counter, Hash, Ino, Inode, Kind, Lease, Limits, NewNode, Remote, SetAttr, Store, VolumeInfo,
};

use crate::access::Access;
use crate::error::{Errno, Result};
pub use crate::names::ROOT_INO;
use crate::names::{
    check_name, check_target, check_xattr, kernel_ino, store_ino, Lookups, NAME_MAX,
};
use crate::open_table::{Handle, ModeKind, OpenInode, OpenTable, PageCache};
use crate::staging::{seek_raw, set_file_mtime};
use crate::types::{access_by_mode, new_node, new_node_owner};
pub use crate::types::{
    Attr, Backing, BackingToken, Ctx, IoMode, KernelCache, Opened, SetAttrIn, StatFs, TimeSet,
};

/// Whether process `pid` (in the daemon's pid namespace, as the kernel reports it) still
/// lives; 0 means no process to watch. A zombie counts as gone: it reads nothing any more.
fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `mode` without setuid, and without setgid when group execution is on (setgid without it
/// marks mandatory locking, which Linux keeps): the bits a write, truncate or chown by a
/// caller without CAP_FSETID clears.
pub(crate) fn killed_mode(mode: u32) -> u32 {
    let mut m = mode & !(libc::S_ISUID);
    if m & libc::S_IXGRP != 0 {
        m &= !(libc::S_ISGID);
    }
    m
}

/// The filesystem over one volume of a store.
pub struct KcacheFs {
    pub(crate) store: Arc<Store>,
    pub(crate) volume: VolumeInfo,
    read_only: bool,
    passthrough: AtomicBool,
    /// The FUSE transport serving this filesystem ("classic", "io_uring"), for stats; set
    /// by the session once FUSE_INIT settled it.
    transport: Mutex<&'static str>,
    /// Lookups the kernel holds on each inode.
    lookups: Lookups,
    /// Handles and the state of open inodes.
    open: OpenTable,
    /// Blob whose pages the kernel may still cache for an inode, to set keep_cache on reopen.
    page_cache: PageCache,
    pub(crate) kernel_cache: Mutex<Option<Arc<dyn KernelCache>>>,
    /// Where this filesystem fetches content only an upstream has: its mount's `upstream=`
    /// options, or the store's remembered upstreams (set by the daemon, `with_remote`).
    /// Per filesystem, so one mount's upstreams never change another's; the downloads
    /// themselves are the store's, shared by every mount. `None`: remote-only content
    /// cannot be fetched here (opens of it fail with EIO).
    remote: Mutex<Option<Arc<Remote>>>,
    /// Files whose last name the daemon took away itself (a merge pull replacing them): the
    /// kernel may still reach them through what it cached before it was told, so they are
    /// purged only once the kernel forgets them, not when their last handle closes.
    pub(crate) kept_until_forgotten: Mutex<HashSet<Ino>>,
    /// What all mounts of one store share: the eviction gate, the limits and the evictor's
    /// state, and the list of mounted filesystems (to check open files across all of them).
    pub(crate) shared: Arc<Shared>,
}

/// State shared by every `KcacheFs` of one store (one per mounted volume).
pub struct Shared {
    /// Opens hold it shared; eviction holds it exclusively while it decides a blob is unused
    /// and removes it, so an open never finds its blob gone half-way.
    pub(crate) evict_gate: std::sync::RwLock<()>,
    pub(crate) quota: crate::evict::QuotaState,
    pub(crate) peers: Mutex<Vec<std::sync::Weak<KcacheFs>>>,
    /// Commits so far, counted once each is in the index: a reader that took the count
    /// before reading an inode's row knows whether a commit may have overtaken that read.
    pub(crate) commits: AtomicU64,
    /// FUSE requests served, by kind, for every mount of the daemon.
    pub(crate) requests: crate::requests::RequestCounts,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its map consistent, so a panic elsewhere does not poison
    // the filesystem for other callers.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KcacheFs {
    pub fn new(store: Arc<Store>, volume: VolumeInfo, read_only: bool) -> KcacheFs {
        let limits = store.limits().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the store's limits failed; using defaults");
            Limits::default()
        });
        let shared = Arc::new(Shared {
            evict_gate: std::sync::RwLock::new(()),
            quota: crate::evict::QuotaState::new(limits),
            peers: Mutex::new(Vec::new()),
            commits: AtomicU64::new(0),
            requests: Default::default(),
        });
        KcacheFs::with_shared(store, volume, read_only, shared)
    }

    /// Fetches content only an upstream has from `remote` (see the field). A builder step,
    /// before the filesystem is shared: a mount's upstreams are fixed for its life.
    pub fn with_remote(self, remote: Option<Arc<Remote>>) -> KcacheFs {
        *lock(&self.remote) = remote;
        self
    }

    /// Where this filesystem fetches from, if anywhere.
    pub fn remote(&self) -> Option<Arc<Remote>> {
        lock(&self.remote).clone()
    }

    /// Gives a filesystem without upstreams `remote` (a pull into a mounted volume that had
    /// none, so that its new names can be fetched); one that has upstreams keeps its own.
    /// True when it was given.
    pub fn adopt_remote_if_none(&self, remote: Arc<Remote>) -> bool {
        let mut r = lock(&self.remote);
        if r.is_some() {
            return false;
        }
        *r = Some(remote);
        true
    }

    /// Another volume of the same store, sharing eviction and limits with `self`. It has no
    /// upstreams of its own until given some (`with_remote`): `self`'s are not inherited.
    pub fn sibling(&self, volume: VolumeInfo, read_only: bool) -> KcacheFs {
        KcacheFs::with_shared(self.store.clone(), volume, read_only, self.shared.clone())
    }

    fn with_shared(
        store: Arc<Store>,
        volume: VolumeInfo,
        read_only: bool,
        shared: Arc<Shared>,
    ) -> KcacheFs {
        KcacheFs {
            shared,
            store,
            volume,
            read_only,
            passthrough: AtomicBool::new(false),
            transport: Mutex::new("none"),
            lookups: Lookups::default(),
            open: OpenTable::default(),
            page_cache: PageCache::default(),
            kernel_cache: Mutex::new(None),
            remote: Mutex::new(None),
            kept_until_forgotten: Mutex::new(HashSet::new()),
        }
    }

    pub fn volume(&self) -> &VolumeInfo {
        &self.volume
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// True once a kernel mount serves this filesystem.
    pub fn is_mounted(&self) -> bool {
        lock(&self.kernel_cache).is_some()
    }

    pub fn set_kernel_cache(&self, kc: Arc<dyn KernelCache>) {
        *lock(&self.kernel_cache) = Some(kc);
    }

    /// True while the kernel or a handle holds inode `ino`.
    pub(crate) fn is_held(&self, ino: Ino) -> bool {
        self.open.inodes().contains_key(&ino) || self.lookups.contains(ino)
    }

    /// Makes this filesystem one of the mounted set: eviction checks its open files and
    /// tells its kernel mount about evicted names.
    pub fn register(self: &Arc<Self>) {
        let mut peers = lock(&self.shared.peers);
        peers.retain(|p| p.strong_count() > 0);
        peers.push(Arc::downgrade(self));
    }

    /// Every registered filesystem of this store.
    pub(crate) fn peers(&self) -> Vec<Arc<KcacheFs>> {
        lock(&self.shared.peers)
            .iter()
            .filter_map(|p| p.upgrade())
            .collect()
    }

    /// True when an open file of any mount of this store holds blob `h`.
    pub(crate) fn blob_in_use_anywhere(&self, h: &Hash) -> bool {
        let peers = self.peers();
        if peers.is_empty() {
            return self.blob_in_use(h);
        }
        peers.iter().any(|p| p.blob_in_use(h))
    }

    /// True when an open file of this filesystem holds blob `h`. An open file whose row
    /// cannot be read counts as holding it: eviction must never take an open file's bytes
    /// on a guess.
    pub(crate) fn blob_in_use(&self, h: &Hash) -> bool {
        let inos: Vec<Ino> = self.open.inos();
        inos.into_iter().any(|ino| match self.store.ns().get(ino) {
            Ok(n) => n.blob == Some(*h),
            Err(e) => {
                tracing::warn!(ino, error = %e, "reading an open file's row failed; its blob is kept as in use");
                true
            }
        })
    }

    /// Enables kernel passthrough for opens (the adapter calls this once the kernel agreed).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Records which FUSE transport serves this filesystem (the session calls it).
    pub fn set_transport(&self, t: &'static str) {
        *lock(&self.transport) = t;
    }

    /// "classic", "io_uring", or "none" before the kernel's FUSE_INIT.
    pub fn transport(&self) -> &'static str {
        *lock(&self.transport)
    }

    /// Kernel inode number -> store inode number.
    fn sino(&self, ino: u64) -> Ino {
        store_ino(ino, self.volume.root)
    }

    /// Store inode number -> kernel inode number.
    pub(crate) fn kino(&self, ino: Ino) -> u64 {
        kernel_ino(ino, self.volume.root)
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Commits so far (see `Shared::commits`; every mount of the daemon together): take it
    /// before reading a row whose attributes go to the kernel, and pass it to `attr_since`.
    /// Background push also uses it to tell whether content changed since its last publish.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::SeqCst)
    }

    /// Attributes of `inode`, with size and times taken from uncommitted staged content.
    fn attr_of(&self, inode: &Inode) -> Result<Attr> {
        self.attr_since(inode, None)
    }

    /// `attr_of` for a row read after the commit count was `seen` (None: unknown).
    /// A row that cannot be read again is an error: an older size would cut the file short.
    fn attr_since(&self, inode: &Inode, seen: Option<u64>) -> Result<Attr> {
        let oi = if inode.kind == Kind::File {
            self.open.get(inode.ino)
        } else {
            None
        };
        let Some(oi) = oi else {
            if inode.kind != Kind::File {
                return Ok(self.plain_attr(inode));
            }
            // Not open now, but `inode` may have been read before a release committed staged
            // content and closed the file: then read the row again, after the look at the
            // open table, so what we answer is never older than what the writers already
            // saw. (The kernel would take an older size over its own and cut the file
            // short.) No commit since the caller's read: its row is fresh enough.
            if seen.is_some_and(|n| n == self.commits()) {
                return Ok(self.plain_attr(inode));
            }
            let fresh = self.store.ns().get(inode.ino)?;
            return Ok(self.plain_attr(&fresh));
        };
        // The file is open: a commit may have changed the row since `inode` was read, so read
        // it again under the per-inode lock, then overlay the staged content.
        let g = lock(&oi);
        let fresh = self.store.ns().get(inode.ino)?;
        let mut attr = self.plain_attr(&fresh);
        if let Some(st) = &g.staging {
            if let Ok(meta) = st.file.metadata() {
                attr.overlay_staged(&meta);
            }
        }
        Ok(attr)
    }

    fn plain_attr(&self, inode: &Inode) -> Attr {
        Attr::from_inode(inode, self.kino(inode.ino))
    }

    fn remember(&self, ino: Ino) {
        self.lookups.remember(ino);
    }

    fn entry(&self, inode: &Inode) -> Result<Attr> {
        self.entry_since(inode, None)
    }

    fn entry_since(&self, inode: &Inode, seen: Option<u64>) -> Result<Attr> {
        // Attributes first: the kernel learns of the entry (and counts a lookup) only if
        // they could be given.
        let attr = self.attr_since(inode, seen)?;
        self.remember(inode.ino);
        Ok(attr)
    }

    /// Purges an inode whose last name is gone once the kernel and all handles let go of it.
    ///
    /// A file without names and handles is unreachable (the kernel can only open it by name),
    /// so it goes at once and its space is freed even while the kernel still caches the inode.
    /// A directory waits until the kernel forgets it: it may still be someone's cwd.
    pub(crate) fn maybe_purge(&self, ino: Ino) {
        if self.open.contains(ino) {
            return;
        }
        // Still linked, gone, or unreadable: nothing to purge.
        let Ok((kind, 0)) = self.store.ns().links(ino) else {
            return;
        };
        // Checked after reading the row: a merge marks what it unlinks before its
        // transaction commits.
        if (kind == Kind::Dir || lock(&self.kept_until_forgotten).contains(&ino))
            && self.lookups.contains(ino)
        {
            return;
        }
        lock(&self.kept_until_forgotten).remove(&ino);
        if let Err(e) = self.store.ns().purge(ino) {
            tracing::error!(ino, error = %e, "purging unlinked inode failed");
        }
    }

    // ---- namespace -------------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let name = name.as_bytes();
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let seen = self.commits();
        let inode = self.store.ns().lookup(self.sino(parent), name)?;
        self.entry_since(&inode, Some(seen))
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        let ino = self.sino(ino);
        if self.lookups.forget(ino, nlookup) {
            // The kernel dropped the inode, and its pages with it.
            self.page_cache.forget(ino);
            self.maybe_purge(ino);
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let seen = self.commits();
        let inode = self.store.ns().get(self.sino(ino))?;
        self.attr_since(&inode, Some(seen))
    }

    /// Creates `name` in `parent` owned by the caller; `node`'s uid and gid are filled in here.
    fn make(&self, parent: u64, name: &OsStr, ctx: Ctx, mut node: NewNode) -> Result<Inode> {
        self.writable()?;
        let name = check_name(name)?;
        let parent = self.store.ns().get(self.sino(parent))?;
        if parent.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let (mode, gid) = new_node_owner(&parent, ctx, node.kind, node.mode);
        node.mode = mode;
        node.uid = ctx.uid;
        node.gid = gid;
        Ok(self.store.ns().create(parent.ino, name, &node)?)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, ctx: Ctx) -> Result<Attr> {
        let n = self.make(parent, name, ctx, new_node(Kind::Dir, mode, 0, None))?;
        self.entry(&n)
    }

    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, ctx: Ctx) -> Result<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return Err(Errno::EINVAL),
        };
        let n = self.make(parent, name, ctx, new_node(kind, mode, rdev, None))?;
        self.entry(&n)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, ctx: Ctx) -> Result<Attr> {
        let t = check_target(target)?;
        let n = self.make(
            parent,
            name,
            ctx,
            new_node(Kind::Symlink, 0o777, 0, Some(t.to_vec())),
        )?;
        self.entry(&n)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let n = self.store.ns().get(self.sino(ino))?;
        match (n.kind, n.target) {
            (Kind::Symlink, Some(t)) => Ok(t),
            _ => Err(Errno::EINVAL),
        }
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        self.writable()?;
        let name = check_name(newname)?;
        let n = self
            .store
            .ns()
            .link(self.sino(ino), self.sino(newparent), name)?;
        self.entry(&n)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.writable()?;
        let name = check_name(name)?;
        let (ino, nlink) = self.store.ns().unlink(self.sino(parent), name)?;
        if nlink == 0 {
            self.maybe_purge(ino);
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.writable()?;
        let name = name.as_bytes();
        if name == b"." {
            return Err(Errno::EINVAL);
        }
        if name == b".." {
            return Err(Errno(libc::ENOTEMPTY));
        }
        let name = check_name(OsStr::from_bytes(name))?;
        let ino = self.store.ns().rmdir(self.sino(parent), name)?;
        self.maybe_purge(ino);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.writable()?;
        let name = check_name(name)?;
        let newname = check_name(newname)?;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(Errno::EINVAL);
        }
        let r = self.store.ns().rename(
            self.sino(parent),
            name,
            self.sino(newparent),
            newname,
            noreplace,
            exchange,
        )?;
        if let Some((ino, 0)) = r.replaced {
            self.maybe_purge(ino);
        }
        Ok(())
    }

    /// One page of a directory listing: entries after `offset` (0 = from the start).
    /// Offsets 1 and 2 are "." and ".."; entry offsets are store cookies + 2.
    /// `plus` entries count as lookups, reported through `accept` returning false when full.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        mut accept: impl FnMut(u64, u64, Kind, &OsStr, Option<&Attr>) -> bool,
    ) -> Result<()> {
        let dir = self.store.ns().get(self.sino(ino))?;
        if dir.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let mut off = offset;
        if off < 1 {
            let attr = plus.then(|| self.attr_of(&dir)).transpose()?;
            if accept(ino, 1, Kind::Dir, OsStr::new("."), attr.as_ref()) {
                return Ok(());
            }
            off = 1;
        }
        if off < 2 {
            let parent = dir.parent.map(|p| self.kino(p)).unwrap_or(ROOT_INO);
            if accept(parent, 2, Kind::Dir, OsStr::new(".."), None) {
                return Ok(());
            }
            off = 2;
        }
        let mut after = off as i64 - 2;
        // An error after entries were given ends the listing there, so the kernel keeps
        // them (their lookups are counted) and asks again from the next offset, where the
        // error is reported if it lasts.
        let mut given = false;
        let fail = |given: bool, e: Errno| if given { Ok(()) } else { Err(e) };
        loop {
            let seen = self.commits();
            let page = match self.store.ns().readdir(dir.ino, after, 256) {
                Ok(p) => p,
                Err(e) => return fail(given, e.into()),
            };
            if page.is_empty() {
                return Ok(());
            }
            for (cookie, name, inode) in page {
                after = cookie;
                let kino = self.kino(inode.ino);
                if plus {
                    let attr = match self.attr_since(&inode, Some(seen)) {
                        Ok(a) => a,
                        Err(e) => return fail(given, e),
                    };
                    if accept(
                        kino,
                        cookie as u64 + 2,
                        inode.kind,
                        OsStr::from_bytes(&name),
                        Some(&attr),
                    ) {
                        return Ok(());
                    }
                    self.remember(inode.ino);
                } else if accept(
                    kino,
                    cookie as u64 + 2,
                    inode.kind,
                    OsStr::from_bytes(&name),
                    None,
                ) {
                    return Ok(());
                }
                given = true;
            }
        }
    }

    /// Clears setuid, and setgid where group execution makes it a real setgid, and drops
    /// `security.capability`: what Linux does to a file written, truncated or chowned by a
    /// caller without CAP_FSETID. The kernel decides when (HANDLE_KILLPRIV_V2 flags it on
    /// WRITE, SETATTR and O_TRUNC opens); the daemon does it, so the kernel no longer asks
    /// for `security.capability` before every write(2).
    pub fn kill_suidgid(&self, ino: u64) -> Result<()> {
        self.kill_suidgid_sino(self.sino(ino))
    }

    /// `kill_suidgid` for the file behind handle `fh`.
    pub fn kill_suidgid_fh(&self, fh: u64) -> Result<()> {
        let (ino, _) = self.handle_ino(fh)?;
        self.kill_suidgid_sino(ino)
    }

    fn kill_suidgid_sino(&self, ino: Ino) -> Result<()> {
        self.writable()?;
        let inode = self.store.ns().get(ino)?;
        if inode.kind != Kind::File {
            return Ok(());
        }
        let killed = killed_mode(inode.mode);
        if killed != inode.mode {
            let sa = SetAttr {
                mode: Some(killed),
                ctime: Some(kcache_store::now_ns()),
                ..SetAttr::default()
            };
            self.store.ns().setattr(ino, &sa)?;
            // No reply carries the new mode (a WRITE's or an OPEN's has no attributes).
            if let Some(kc) = lock(&self.kernel_cache).clone() {
                kc.attrs_changed(self.kino(ino));
            }
        }
        self.drop_capability(ino)
    }

    /// Removes `security.capability`, if the file has it.
    fn drop_capability(&self, ino: Ino) -> Result<()> {
        match self.store.ns().removexattr(ino, b"security.capability") {
            Ok(()) => Ok(()),
            Err(kcache_store::Error::NoAttr) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Permission checks (who may chown, set times, clear setgid) are the kernel's: the mount
    /// always uses `default_permissions`.
    pub fn setattr(&self, ino: u64, a: &SetAttrIn) -> Result<Attr> {
        self.writable()?;
        let sino = self.sino(ino);
        let inode = self.store.ns().get(sino)?;
        let now = kcache_store::now_ns();
        let resolve = |t: Option<TimeSet>| {
            t.map(|t| match t {
                TimeSet::Now => now,
                TimeSet::At(v) => v,
            })
        };
        let mut mtime = resolve(a.mtime);
        if let Some(size) = a.size {
            if inode.kind == Kind::Dir {
                return Err(Errno::EISDIR);
            }
            if inode.kind != Kind::File {
                return Err(Errno::EINVAL);
            }
            self.truncate(sino, size)?;
            if mtime.is_none() {
                mtime = Some(now);
            }
        }
        let mut mode = a.mode;
        if a.kill_suidgid {
            // As the kernel would for a truncate or chown by this caller (HANDLE_KILLPRIV_V2):
            // on the mode being set, or the file's own.
            let from = mode.unwrap_or(inode.mode);
            let killed = killed_mode(from);
            if killed != from {
                mode = Some(killed);
            }
            self.drop_capability(sino)?;
        }
        let sa = SetAttr {
            mode,
            uid: a.uid,
            gid: a.gid,
            size: None,
            atime: resolve(a.atime),
            mtime,
            ctime: Some(now),
        };
        let updated = self.store.ns().setattr(sino, &sa)?;
        if let Some(m) = mtime {
            // While staged, the staging file's mtime is the file's mtime; keep them equal.
            if let Some(oi) = self.open.inodes().get(&sino).cloned() {
                if let Some(st) = &lock(&oi).staging {
                    let _ = set_file_mtime(&st.file, m);
                }
            }
        }
        self.attr_of(&updated)
    }

    /// Sets a file's length: through its staging file when open, else as a one-shot commit.
    fn truncate(&self, ino: Ino, size: u64) -> Result<()> {
        self.open.with_inode(ino, |g| {
            if g.handles > 0 || g.staging.is_some() {
                // Open: change the staged content; the last writer's release commits it.
                let file = g.staging_for_write(&self.store, ino)?;
                file.set_len(size)?;
                if g.writers == 0 {
                    self.commit(ino, g, false)?;
                }
                return Ok(());
            }
            if size == 0 {
                self.store.ns().clear_content(ino, kcache_store::now_ns())?;
                return Ok(());
            }
            let file = g.staging_for_write(&self.store, ino)?;
            file.set_len(size)?;
            set_file_mtime(&file, kcache_store::now_ns())?;
            self.commit(ino, g, false)
        })
    }

    // ---- open files ------------------------------------------------------------------

    /// Creates and opens a file (or opens it, without O_EXCL, if the name exists), waiting
    /// for a download of an existing file's content if one is needed.
    ///
    /// `kill_suidgid`: an existing file opened this way (O_TRUNC by a caller without
    /// CAP_FSETID) loses setuid/setgid, see `kill_suidgid`; a file created here keeps the
    /// mode it was created with.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        ctx: Ctx,
        kill_suidgid: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<(Attr, Opened)> {
        let wait = Some(ctx.pid);
        self.create_inner(parent, name, mode, flags, ctx, kill_suidgid, backing, wait)
    }

    /// Like `create`, but answers `Errno::WOULD_BLOCK` instead of waiting for a download (an
    /// existing file whose content only an upstream has); calling `create` again then waits.
    #[allow(clippy::too_many_arguments)]
    pub fn create_nowait(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        ctx: Ctx,
        kill_suidgid: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<(Attr, Opened)> {
        self.create_inner(parent, name, mode, flags, ctx, kill_suidgid, backing, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_inner(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        ctx: Ctx,
        kill_suidgid: bool,
        backing: Option<&dyn Backing>,
        wait: Option<u32>,
    ) -> Result<(Attr, Opened)> {
        let (inode, existed) =
            match self.make(parent, name, ctx, new_node(Kind::File, mode, 0, None)) {
                Ok(n) => (n, false),
                // Lost a race with another creator: without O_EXCL that is an ordinary open.
                Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => (
                    self.store.ns().lookup(self.sino(parent), name.as_bytes())?,
                    true,
                ),
                Err(e) => return Err(e),
            };
        if inode.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        if existed && kill_suidgid {
            // Before the open: failing it leaves no handle behind.
            self.kill_suidgid_sino(inode.ino)?;
        }
        let opened = self.open_sino(inode.ino, flags, backing, wait)?;
        if !existed {
            // A new file's first write need not look for a capability to remove: it has
            // none, unless someone set one since the name appeared (checked under the inode
            // lock, which a setxattr of it takes too).
            self.open.with_inode(inode.ino, |g| {
                g.capability_gone = matches!(
                    self.store.ns().getxattr(inode.ino, b"security.capability"),
                    Err(kcache_store::Error::NoAttr)
                );
            });
        }
        let entry = (|| -> Result<Attr> {
            let inode = self.store.ns().get(inode.ino)?;
            self.entry(&inode)
        })();
        match entry {
            Ok(attr) => Ok((attr, opened)),
            Err(e) => {
                // No answer reaches the kernel, so no RELEASE will ever come for this
                // handle: undo it here, or it would stay counted (a direct writer would keep
                // every later handle of the file direct).
                let _ = self.release(opened.fh);
                Err(e)
            }
        }
    }

    /// Opens a file, waiting for a download of its content if one is needed.
    pub fn open(&self, ino: u64, flags: i32, backing: Option<&dyn Backing>) -> Result<Opened> {
        self.open_sino(self.sino(ino), flags, backing, Some(0))
    }

    /// Like `open`, but answers `Errno::WOULD_BLOCK` instead of waiting for a download.
    pub fn open_nowait(
        &self,
        ino: u64,
        flags: i32,
        backing: Option<&dyn Backing>,
    ) -> Result<Opened> {
        self.open_sino(self.sino(ino), flags, backing, None)
    }

    /// Like `open`, on behalf of process `pid`: a download it waits for is given up (and
    /// cancelled, if nobody else wants it) once that process is gone.
    pub fn open_for(
        &self,
        ino: u64,
        flags: i32,
        backing: Option<&dyn Backing>,
        pid: u32,
    ) -> Result<Opened> {
        self.open_sino(self.sino(ino), flags, backing, Some(pid))
    }

    /// `wait`: None = answer WOULD_BLOCK rather than wait for a download; Some(pid) = wait
    /// while process `pid` lives (0: no process to watch).
    fn open_sino(
        &self,
        ino: Ino,
        flags: i32,
        backing: Option<&dyn Backing>,
        wait: Option<u32>,
    ) -> Result<Opened> {
        let access = Access::from_flags(flags);
        let Access {
            writable, trunc, ..
        } = access;
        if writable {
            self.writable()?;
        }
        // Content only an upstream has is fetched first, without any lock held: a download
        // must not hold up eviction or other opens. (Fetched here rather than on a failed
        // open, because daemon-served reads and copy-on-write open the blob only later.)
        // Filesystems without upstreams skip the lookup. A reader of a blob with an outboard
        // gets its handle at once and reads while the download goes on; anyone else waits for
        // the whole blob. Eviction may drop the content again before the open below takes the
        // gate; then fetch again.
        let remote = self.remote();
        let remote = remote.as_ref();
        let mut attempt = 0;
        let mut refetched = false;
        loop {
            let (blob, size) = if remote.is_some() && !trunc {
                let inode = self.store.ns().get(ino)?;
                (inode.blob, inode.size)
            } else {
                (None, 0)
            };
            let mut lease = None;
            let mut waited = false;
            if let (Some(h), Some(remote)) = (&blob, remote) {
                let remote_only = self.store.is_remote_only(h);
                let Some(pid) = wait else {
                    if remote_only {
                        return Err(Errno::WOULD_BLOCK);
                    }
                    return self.open_gated(ino, access, backing, None, wait);
                };
                if remote_only && !self.store.is_fetching(h) {
                    // A download is a write like any other: room first (evicting if need be),
                    // and ENOSPC, not a half-done download, for a file that cannot fit.
                    // (Joining a download under way: its room was made when it started.)
                    if let Err(e) = self.make_room(size, size) {
                        tracing::warn!(
                            ino,
                            bytes = size,
                            "no room to download this file's content (quota or disk)"
                        );
                        return Err(e);
                    }
                }
                let mut retry = false;
                let fetched = self.store.fetch(h, remote).and_then(|l| match l {
                    Some(l) if !writable && l.streamable() => Ok(Some(Arc::new(l))),
                    Some(l) => l
                        .wait(&|| pid_alive(pid))
                        .map(|()| {
                            waited = true;
                            None
                        })
                        .inspect_err(|_| retry = l.may_retry_with_own_upstreams()),
                    None => Ok(None),
                });
                match fetched {
                    Ok(l) => lease = l,
                    // The download joined came from another mount's upstreams and failed
                    // there: once more, from this mount's own.
                    Err(_) if retry && !refetched => {
                        refetched = true;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(ino, error = %e, "open failed");
                        // No room is said as such; every other failure to fetch is EIO.
                        return Err(match e.errno() {
                            libc::ENOSPC => Errno(libc::ENOSPC),
                            _ => Errno::EIO,
                        });
                    }
                }
            }
            match self.open_gated(ino, access, backing, lease, wait) {
                Err(e)
                    if e == Errno::EIO
                        && attempt < 2
                        && blob.is_some_and(|h| self.store.is_remote_only(&h)) =>
                {
                    attempt += 1;
                }
                res => {
                    if waited && res.is_ok() {
                        // The download added to the store's usage, as a commit does; the new
                        // handle keeps this file's content from being the one evicted.
                        self.after_commit();
                    }
                    return res;
                }
            }
        }
    }

    /// `open_gated_once`, waiting (when `wait` allows) for the inode's passthrough readers
    /// to close if this open writes: the kernel lets no handle but another passthrough one
    /// join them, and a writer must never be passthrough to a blob. Bounded: after
    /// `PASSTHROUGH_WAIT` the open fails with ETXTBSY (as writing a running program does).
    fn open_gated(
        &self,
        ino: Ino,
        access: Access,
        backing: Option<&dyn Backing>,
        lease: Option<Arc<Lease>>,
        wait: Option<u32>,
    ) -> Result<Opened> {
        const PASSTHROUGH_WAIT: Duration = Duration::from_secs(10);
        let deadline = Instant::now() + PASSTHROUGH_WAIT;
        let mut counted = false;
        let res = loop {
            match self.open_gated_once(ino, access, backing, lease.clone()) {
                Err(e) if e == Errno::PASSTHROUGH_HELD => {
                    let Some(pid) = wait else {
                        // From a request thread: the adapter repeats it on a thread of its own.
                        break Err(Errno::WOULD_BLOCK);
                    };
                    if access.writable && !counted {
                        counted = true;
                        self.open.with_inode(ino, |g| g.writers_waiting += 1);
                    }
                    if Instant::now() >= deadline || (pid != 0 && !pid_alive(pid)) {
                        tracing::warn!(
                            ino,
                            writable = access.writable,
                            "an open waited {} s for readers served by kernel passthrough to close; refusing it (ETXTBSY)",
                            PASSTHROUGH_WAIT.as_secs()
                        );
                        break Err(Errno(libc::ETXTBSY));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                res => break res,
            }
        };
        if counted {
            self.open.with_inode(ino, |g| {
                g.writers_waiting = g.writers_waiting.saturating_sub(1)
            });
        }
        res
    }

    fn open_gated_once(
        &self,
        ino: Ino,
        access: Access,
        backing: Option<&dyn Backing>,
        lease: Option<Arc<Lease>>,
    ) -> Result<Opened> {
        let _gate = self
            .shared
            .evict_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        // Read the inode under the per-inode lock: a concurrent release may be committing new
        // content for it right now, and a copy read before the lock could be stale.
        let mode = self.open.with_inode(ino, |g| {
            let seen = self.store.inode_changes();
            let inode = self.store.ns().get(ino)?;
            g.linked_as_of = (inode.nlink > 0).then_some(seen);
            match inode.kind {
                Kind::File => {}
                Kind::Dir => return Err(Errno::EISDIR),
                _ => return Err(Errno(libc::ENXIO)),
            }
            // A download still under way: reads go through it.
            let lease = lease.filter(|l| inode.blob == Some(l.hash()) && !l.is_done());
            let mode = g.open_handle(
                &self.store,
                &self.page_cache,
                &self.passthrough,
                &inode,
                access,
                backing,
                lease.is_some(),
            )?;
            Ok((mode, lease))
        })?;
        let (mode, lease) = mode;
        let mode_kind = ModeKind::of(&mode);
        let fh = self.open.next_fh();
        self.store.count(Counter::Opens, 1);
        tracing::debug!(ino, fh, ?mode, ?access, "open");
        self.open.insert_handle(
            fh,
            Handle {
                ino,
                writable: access.writable,
                mode_kind,
                lease,
            },
        );
        Ok(Opened { fh, mode })
    }

    /// The file daemon-served I/O on `ino` goes to: staged content, else the committed blob.
    fn source(&self, ino: Ino) -> Result<Option<Arc<File>>> {
        let oi = self.open.get(ino).ok_or(Errno::EBADF)?;
        let mut g = lock(&oi);
        if let Some(st) = &g.staging {
            return Ok(Some(st.file.clone()));
        }
        let inode = self.store.ns().get(ino)?;
        match inode.blob {
            Some(h) => Ok(Some(g.blob_file(&self.store, h)?)),
            None => Ok(None),
        }
    }

    /// Whether reads of `ino` still go through download `l`: nothing is staged and the file
    /// still has the content being downloaded.
    fn reads_through(&self, ino: Ino, l: &Lease) -> Result<bool> {
        let Some(oi) = self.open.get(ino) else {
            return Ok(false);
        };
        if lock(&oi).staging.is_some() {
            return Ok(false);
        }
        Ok(self.store.ns().get(ino)?.blob == Some(l.hash()))
    }

    fn handle_ino(&self, fh: u64) -> Result<(Ino, bool)> {
        self.open.handle_ino(fh).ok_or(Errno::EBADF)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.read_inner(fh, offset, size, true)
    }

    /// Like `read`, but answers `Errno::WOULD_BLOCK` instead of waiting for a download.
    pub fn read_nowait(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.read_inner(fh, offset, size, false)
    }

    fn read_inner(&self, fh: u64, offset: u64, size: u32, wait: bool) -> Result<Vec<u8>> {
        let (ino, lease) = self.open.handle_lease(fh).ok_or(Errno::EBADF)?;
        let lease = match lease {
            Some(l) if self.reads_through(ino, &l)? => Some(l),
            _ => None,
        };
        if let Some(l) = lease {
            if !wait && !l.ready(offset, size as u64) {
                return Err(Errno::WOULD_BLOCK);
            }
            let mut buf = vec![0u8; size as usize];
            let n = l.read_at(&mut buf, offset).map_err(|e| {
                tracing::error!(ino, error = %e, "read failed");
                Errno::EIO
            })?;
            buf.truncate(n);
            self.store.count(Counter::BytesRead, n as u64);
            return Ok(buf);
        }
        let Some(file) = self.source(ino)? else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        self.store.count(Counter::BytesRead, done as u64);
        Ok(buf)
    }

    /// The open per-inode state behind a writable handle.
    fn writable_handle(&self, fh: u64) -> Result<(Ino, ModeKind, Arc<Mutex<OpenInode>>)> {
        let (ino, writable, mode) = self.open.handle_mode(fh).ok_or(Errno::EBADF)?;
        if !writable {
            return Err(Errno::EBADF);
        }
        let oi = self.open.get(ino).ok_or(Errno::EBADF)?;
        Ok((ino, mode, oi))
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let (ino, mode, oi) = self.writable_handle(fh)?;
        let direct = mode == ModeKind::Direct;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        self.make_room(data.len() as u64, end)?;
        // Under the inode's lock, so a concurrent commit never hashes or renames a file that
        // is still being written. The kernel resolves O_APPEND to an offset before sending.
        let mut retried = false;
        loop {
            let mut g = lock(&oi);
            if direct && !g.capability_gone {
                // A write removes `security.capability`, whoever writes (as on ext4). The
                // kernel does that itself before a write(2) through the page cache (and not
                // for a mapping's writeback, as on ext4), but not before a direct one
                // (O_WRONLY handles are direct; see `open_handle`).
                self.drop_capability(ino)?;
                g.capability_gone = true;
            }
            let st = g.staging_mut(&self.store, ino)?;
            match st.file.write_all_at(data, offset) {
                Ok(()) => {
                    st.note_write(offset, data);
                    break;
                }
                Err(e) => {
                    st.stream = None;
                    if e.raw_os_error() != Some(libc::ENOSPC) || retried {
                        return Err(e.into());
                    }
                }
            }
            // The disk filled up behind our back: evict, then write again (the same bytes at
            // the same offset, so a partial first attempt does no harm). Without the inode
            // lock, which an open waiting on the eviction gate may need.
            drop(g);
            retried = true;
            self.make_room(data.len() as u64, end)?;
        }
        self.store.count(Counter::BytesWritten, data.len() as u64);
        Ok(data.len() as u32)
    }

    /// fallocate(2) on the staged content, with ext4's modes: preallocation (KEEP_SIZE or
    /// not), PUNCH_HOLE, ZERO_RANGE, COLLAPSE_RANGE and INSERT_RANGE, done by the staging
    /// file's own filesystem. (Linux's FUSE module passes on only the first three and answers
    /// EOPNOTSUPP to the others itself; they work here for the day it does.) Anything that
    /// may take disk space makes room first, as a write does.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        const KNOWN: i32 = libc::FALLOC_FL_KEEP_SIZE
            | libc::FALLOC_FL_PUNCH_HOLE
            | libc::FALLOC_FL_ZERO_RANGE
            | libc::FALLOC_FL_COLLAPSE_RANGE
            | libc::FALLOC_FL_INSERT_RANGE;
        if mode & !KNOWN != 0 {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let (ino, _, oi) = self.writable_handle(fh)?;
        let (off, len) = (
            i64::try_from(offset).map_err(|_| Errno::EFBIG)?,
            i64::try_from(length).map_err(|_| Errno::EFBIG)?,
        );
        let end = off.checked_add(len).ok_or(Errno::EFBIG)? as u64;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        // (bytes that may be allocated, the file's size afterwards) for make_room; None for
        // the modes that only free space or move it.
        let room = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 | libc::FALLOC_FL_ZERO_RANGE => Some((length, if keep { 0 } else { end })),
            libc::FALLOC_FL_INSERT_RANGE => {
                let size = self.staged_size(ino, &oi)?;
                Some((length, size.saturating_add(length)))
            }
            _ => None,
        };
        let mut retried = false;
        loop {
            if let Some((bytes, size)) = room {
                self.make_room(bytes, size)?;
            }
            let mut g = lock(&oi);
            let file = g.staging_for_write(&self.store, ino)?;
            // SAFETY: fallocate on a valid descriptor we own.
            if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // The disk filled up behind our back: evict (without the inode lock), then try
            // once more, as a write does.
            if e.raw_os_error() != Some(libc::ENOSPC) || retried || room.is_none() {
                return Err(e.into());
            }
            drop(g);
            retried = true;
        }
    }

    /// The current length of an open inode's content (staged, else committed).
    fn staged_size(&self, ino: Ino, oi: &Mutex<OpenInode>) -> Result<u64> {
        if let Some(st) = &lock(oi).staging {
            return Ok(st.len()?);
        }
        Ok(self.store.ns().get(ino)?.size)
    }

    /// SEEK_DATA and SEEK_HOLE on an open file, answered by the file behind it: the staging
    /// file while staged, else the blob file, so the holes reported are the ones on disk
    /// (ENXIO at or past the end, as on ext4). The kernel resolves SEEK_SET, SEEK_CUR and
    /// SEEK_END itself and sends only these two, for passthrough handles too. A file still
    /// downloading is all data (the answer of filesystems that know no holes): its bytes
    /// are not all there yet.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(Errno::EINVAL);
        }
        let (ino, lease) = self.open.handle_lease(fh).ok_or(Errno::EBADF)?;
        let through = match &lease {
            Some(l) if !l.is_done() => self.reads_through(ino, l)?,
            _ => false,
        };
        if through {
            let size = self.store.ns().get(ino)?.size;
            return match u64::try_from(offset) {
                Ok(o) if o < size && whence == libc::SEEK_DATA => Ok(offset),
                Ok(o) if o < size => Ok(size as i64),
                _ => Err(Errno(libc::ENXIO)),
            };
        }
        match self.source(ino)? {
            Some(file) => Ok(seek_raw(&file, offset, whence)?),
            // No content at all: every offset is at or past the end.
            None => Err(Errno(libc::ENXIO)),
        }
    }

    /// Commits staged content now (fsync): durable when this returns.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        let (ino, _) = self.handle_ino(fh)?;
        let oi = self.open.get(ino).ok_or(Errno::EBADF)?;
        let mut g = lock(&oi);
        if g.staging.as_ref().is_some_and(|s| s.dirty) {
            self.commit(ino, &mut g, true)?;
            drop(g);
            self.after_commit();
            return Ok(());
        }
        // Nothing staged, but the content may have been committed without a sync (at a
        // close, into the open group commit): the blob file and its row must reach the disk
        // before fsync may answer, or a crash soon after would take back what fsync promised.
        // A read-only store changed nothing through this daemon: nothing to sync.
        if self.store.is_read_only() {
            return Ok(());
        }
        // Under the inode lock, so no commit replaces (and frees) the blob meanwhile.
        if let Some(h) = self.store.ns().get(ino)?.blob {
            self.store.blobs().sync_blob(&h)?;
        }
        drop(g);
        Ok(self.store.sync()?)
    }

    /// Commits `ino`'s staged content (see `OpenInode::commit`); the caller holds its lock.
    fn commit(&self, ino: Ino, g: &mut OpenInode, durable: bool) -> Result<()> {
        g.commit(
            &self.store,
            ino,
            durable,
            &self.shared.commits,
            &self.page_cache,
        )
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(h) = self.open.remove_handle(fh) else {
            return Err(Errno::EBADF);
        };
        let ino = h.ino;
        tracing::debug!(ino, fh, "release");
        let Some(oi) = self.open.get(ino) else {
            return Ok(());
        };
        let mut g = lock(&oi);
        g.drop_handle(&h);
        // The last direct writer gone while other handles stay: those are direct too, but an
        // mmap of one fills the page cache, and a page it faulted in while a direct write was
        // on its way (the kernel drops pages before a direct write, not after) can hold the
        // old bytes. Dropped once the writes are done, below.
        let drop_pages =
            h.writable && h.mode_kind == ModeKind::Direct && g.direct_writers == 0 && g.handles > 0;
        let mut res = Ok(());
        let committing = g.writers == 0 && g.staging.as_ref().is_some_and(|s| s.dirty);
        if committing {
            res = self.commit(ino, &mut g, false);
            if let Err(e) = res {
                tracing::error!(ino, errno = e.0, "committing a closed file failed; its new content stays staged until the next close or fsync");
            }
        }
        if g.handles == 0 {
            g.last_handle_closed(&self.store, ino);
        }
        let linked_as_of = g.linked_as_of;
        drop(g);
        self.open.release_inode(ino, &oi);
        // Linked when opened and no inode row changed since: nothing to purge, and no need
        // to read the row to know it (the common close of a file only read). Compared after
        // the inode left the open table: an unlink counted later sees it gone from there and
        // purges by itself.
        let linked = linked_as_of.is_some() && linked_as_of == Some(self.store.inode_changes());
        if !linked {
            self.maybe_purge(ino);
        }
        if committing {
            self.after_commit();
        }
        if drop_pages {
            self.drop_pages_later(ino);
        }
        res
    }

    /// Has the kernel drop `ino`'s cached pages, from a thread of its own: a request handler
    /// must never wait for page locks (a page may be locked by a read only this mount can
    /// answer).
    fn drop_pages_later(&self, ino: Ino) {
        let Some(kc) = lock(&self.kernel_cache).clone() else {
            return;
        };
        let kino = self.kino(ino);
        let spawned = std::thread::Builder::new()
            .name("kcache-inval".into())
            .spawn(move || kc.pages_changed(kino));
        if let Err(e) = spawned {
            tracing::warn!(ino, error = %e, "no thread to drop a written file's pages; a mapping of it may show old bytes until reopened");
        }
    }

    /// fsync(2) on a directory: every namespace change so far reaches the disk.
    pub fn fsyncdir(&self) -> Result<()> {
        if self.store.is_read_only() {
            return Ok(());
        }
        Ok(self.store.sync()?)
    }

    /// Commits everything still staged (unmount).
    pub fn flush_all(&self) {
        let all: Vec<(Ino, Arc<Mutex<OpenInode>>)> = self.open.all();
        for (ino, oi) in all {
            let mut g = lock(&oi);
            if g.staging.as_ref().is_some_and(|s| s.dirty) {
                if let Err(e) = self.commit(ino, &mut g, false) {
                    tracing::error!(ino, errno = e.0, "commit at unmount failed");
                }
            }
        }
    }

    // ---- xattrs, access, statfs --------------------------------------------------------

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        Ok(self.store.ns().getxattr(self.sino(ino), name.as_bytes())?)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.writable()?;
        let name = check_xattr(name, value)?;
        let sino = self.sino(ino);
        let set = || {
            self.store.ns().setxattr(
                sino,
                name,
                value,
                flags & libc::XATTR_CREATE != 0,
                flags & libc::XATTR_REPLACE != 0,
            )
        };
        if name == b"security.capability" {
            // Under the inode lock, which writes take to check the flag (and a new file's
            // create to set it): once the capability is there, no write sees the flag still
            // set. The next write removes it again.
            self.open.with_inode(sino, |g| {
                g.capability_gone = false;
                set()
            })?;
        } else {
            set()?;
        }
        Ok(())
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for n in self.store.ns().listxattr(self.sino(ino))? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        self.writable()?;
        Ok(self
            .store
            .ns()
            .removexattr(self.sino(ino), name.as_bytes())?)
    }

    /// access(2) by mode bits (only asked when the kernel does not check permissions itself).
    pub fn access(&self, ino: u64, mask: i32, ctx: Ctx) -> Result<()> {
        let n = self.store.ns().get(self.sino(ino))?;
        access_by_mode(&n, mask, ctx, self.read_only)
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let s = self.store.disk_space()?;
        Ok(StatFs {
            blocks: s.blocks,
            bfree: s.bfree,
            bavail: s.bavail,
            files: s.files,
            ffree: s.ffree,
            bsize: s.bsize,
            namelen: NAME_MAX as u32,
            frsize: s.frsize,
        })
    }

    /// How long the kernel may cache entries and attributes: everything changes through this
    /// daemon, which tells the kernel when it changes something behind its back.
    /// FUSE requests served so far, by kind (every mount of the daemon together).
    pub fn requests(&self) -> &crate::requests::RequestCounts {
        &self.shared.requests
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(3600)
    }
}
