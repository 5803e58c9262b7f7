//! The thin fuser adapter: translates kernel requests into `KcacheFs` calls and results into
//! replies. No filesystem logic lives here.
//!
//! Locks: FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS are deliberately not requested, so the kernel
//! itself implements flock(2) and fcntl(2) byte-range locks for this mount. They then exclude
//! across every process using the mount (in any mount namespace, since they hang off the one
//! kernel inode) and die with their holder, which is what pip, huggingface_hub, cargo and
//! SQLite rely on.
//!
//! Passthrough: the kernel insists that all passthrough handles of one inode share a backing
//! file and that passthrough and page-cached handles never coexist on an inode. `KcacheFs`
//! picks modes that respect this; a refused registration falls back to daemon-served I/O.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno as FErrno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use kcache_store::Kind;

use crate::core::{Attr, Backing, BackingToken, Ctx, IoMode, KcacheFs, SetAttrIn, TimeSet};
use crate::error::Errno;
use crate::requests::Op;

/// The fuser `Filesystem` for one mounted volume.
pub struct KcacheFuse {
    fs: Arc<KcacheFs>,
    want_passthrough: bool,
}

impl KcacheFuse {
    pub fn new(fs: Arc<KcacheFs>, want_passthrough: bool) -> KcacheFuse {
        KcacheFuse {
            fs,
            want_passthrough,
        }
    }
}

fn ferr(e: Errno) -> FErrno {
    FErrno::from_i32(e.0)
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn systime(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn ftype(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: systime(a.ctime),
        kind: ftype(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Attributes for entries the kernel takes no attributes from: negative lookups (inode 0)
/// and ".." in readdirplus.
fn placeholder_attr(ino: u64, kind: Kind) -> FileAttr {
    fattr(&Attr {
        ino,
        kind,
        perm: 0,
        uid: 0,
        gid: 0,
        size: 0,
        blocks: 0,
        atime: 0,
        mtime: 0,
        ctime: 0,
        nlink: 0,
        rdev: 0,
    })
}

/// Registers backing files through the reply of the open or create being answered.
struct OpenReg<'a>(&'a ReplyOpen);
struct CreateReg<'a>(&'a ReplyCreate);

impl Backing for OpenReg<'_> {
    fn register(&self, file: &std::fs::File) -> std::io::Result<BackingToken> {
        Ok(Arc::new(self.0.open_backing(file)?))
    }
}

impl Backing for CreateReg<'_> {
    fn register(&self, file: &std::fs::File) -> std::io::Result<BackingToken> {
        Ok(Arc::new(self.0.open_backing(file)?))
    }
}

fn reply_open(reply: ReplyOpen, res: crate::error::Result<crate::core::Opened>) {
    match res {
        Ok(o) => match &o.mode {
            IoMode::Passthrough(token) => match backing_id(token) {
                Some(id) => reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), id),
                None => reply.error(FErrno::EIO),
            },
            m => reply.opened(FileHandle(o.fh), open_flags(m)),
        },
        Err(e) => reply.error(ferr(e)),
    }
}

/// Answers a create: the new handle's I/O mode, or the error.
fn reply_create(
    fs: &KcacheFs,
    reply: ReplyCreate,
    res: crate::error::Result<(Attr, crate::core::Opened)>,
) {
    match res {
        Ok((a, o)) => match &o.mode {
            IoMode::Passthrough(token) => match backing_id(token) {
                Some(id) => reply.created_passthrough(
                    &fs.ttl(),
                    &fattr(&a),
                    Generation(0),
                    FileHandle(o.fh),
                    FopenFlags::empty(),
                    id,
                ),
                None => reply.error(FErrno::EIO),
            },
            m => reply.created(
                &fs.ttl(),
                &fattr(&a),
                Generation(0),
                FileHandle(o.fh),
                open_flags(m),
            ),
        },
        Err(e) => reply.error(ferr(e)),
    }
}

/// Runs `f` (which replies to a request) on a thread of its own; if no thread can be made,
/// runs it here rather than leave the request unanswered.
fn spawn_waiter(name: &str, f: impl FnOnce() + Send + 'static) {
    let f = std::sync::Mutex::new(Some(f));
    let f = Arc::new(f);
    let g = f.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Some(f) = g.lock().unwrap_or_else(|p| p.into_inner()).take() {
                f()
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a waiting request; waiting on a request thread");
        if let Some(f) = f.lock().unwrap_or_else(|p| p.into_inner()).take() {
            f()
        }
    }
}

fn open_flags(mode: &IoMode) -> FopenFlags {
    match mode {
        IoMode::Passthrough(_) => FopenFlags::empty(),
        IoMode::Cached { keep_cache: true } => FopenFlags::FOPEN_KEEP_CACHE,
        IoMode::Cached { keep_cache: false } => FopenFlags::empty(),
        IoMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
    }
}

fn backing_id(token: &BackingToken) -> Option<&BackingId> {
    token.downcast_ref::<BackingId>()
}

impl Filesystem for KcacheFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            | InitFlags::FUSE_ASYNC_DIO;
        let _ = config.add_capabilities(wanted & caps);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        let mut mode = "userspace reads with the kernel page cache";
        if self.want_passthrough {
            if caps.contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.fs.set_passthrough(true);
                mode = "kernel passthrough";
            } else {
                mode =
                    "userspace reads with the kernel page cache (kernel has no FUSE passthrough)";
            }
        }
        tracing::info!(io = mode, "fuse session initialised");
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.flush_all();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.fs.requests().count(Op::Opendir);
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Releasedir);
        reply.ok();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.fs.requests().count(Op::Lookup);
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.fs.ttl(), &fattr(&a), Generation(0)),
            Err(e) if e == Errno::ENOENT => {
                // A negative entry with the same long TTL: every create goes through us, and
                // the kernel drops the negative dentry when it does.
                let a = placeholder_attr(0, Kind::File);
                reply.entry(&self.fs.ttl(), &a, Generation(0))
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.requests().count(Op::Forget);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.fs.requests().count(Op::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.fs.ttl(), &fattr(&a)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.fs.requests().count(Op::Setattr);
        let t = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::Now => TimeSet::Now,
                TimeOrNow::SpecificTime(s) => TimeSet::At(ns_of(s)),
            })
        };
        let a = SetAttrIn {
            mode,
            uid,
            gid,
            size,
            atime: t(atime),
            mtime: t(mtime),
        };
        match self.fs.setattr(ino.0, &a) {
            Ok(a) => reply.attr(&self.fs.ttl(), &fattr(&a)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.fs.requests().count(Op::Readlink);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.fs.requests().count(Op::Mknod);
        self.reply_entry(reply, self.fs.mknod(parent.0, name, mode, rdev, ctx(req)));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.fs.requests().count(Op::Mkdir);
        self.reply_entry(reply, self.fs.mkdir(parent.0, name, mode, ctx(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.fs.requests().count(Op::Unlink);
        reply_empty(reply, self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.fs.requests().count(Op::Rmdir);
        reply_empty(reply, self.fs.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.fs.requests().count(Op::Symlink);
        let r = self
            .fs
            .symlink(parent.0, link_name, target.as_os_str(), ctx(req));
        self.reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Rename);
        let r = self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.fs.requests().count(Op::Link);
        self.reply_entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.fs.requests().count(Op::Open);
        match self.fs.open_nowait(ino.0, flags.0, Some(&OpenReg(&reply))) {
            Err(e) if e == Errno::WOULD_BLOCK => {
                // The content must be downloaded first: wait on a thread of our own, so the
                // request threads stay free for everything else (local files stay fast).
                let (fs, pid) = (self.fs.clone(), req.pid());
                spawn_waiter("kcache-open", move || {
                    let res = fs.open_for(ino.0, flags.0, Some(&OpenReg(&reply)), pid);
                    reply_open(reply, res);
                });
            }
            res => reply_open(reply, res),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.fs.requests().count(Op::Read);
        match self.fs.read_nowait(fh.0, offset, size) {
            Err(e) if e == Errno::WOULD_BLOCK => {
                // Part of a file still downloading: wait for it off the request threads.
                let fs = self.fs.clone();
                spawn_waiter("kcache-read", move || match fs.read(fh.0, offset, size) {
                    Ok(d) => reply.data(&d),
                    Err(e) => reply.error(ferr(e)),
                });
            }
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.fs.requests().count(Op::Write);
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Flush);
        // Nothing to do at close(2): writes are already in the staging file and commits happen
        // at release. ENOSYS tells the kernel to stop sending FLUSH, saving a round trip on
        // every close.
        reply.error(FErrno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Release);
        reply_empty(reply, self.fs.release(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Fsync);
        reply_empty(reply, self.fs.fsync(fh.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.fs.requests().count(Op::Readdir);
        let res = self
            .fs
            .readdir(ino.0, offset, false, |ino, off, kind, name, _| {
                reply.add(INodeNo(ino), off, ftype(kind), name)
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.fs.requests().count(Op::Readdirplus);
        let ttl = self.fs.ttl();
        let res = self
            .fs
            .readdir(ino.0, offset, true, |ino, off, kind, name, attr| {
                let fa = match attr {
                    Some(a) => fattr(a),
                    // ".." gets no attributes: the kernel ignores the entry's attributes for it.
                    None => placeholder_attr(ino, kind),
                };
                reply.add(INodeNo(ino), off, name, &ttl, &fa, Generation(0))
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Fsyncdir);
        reply_empty(reply, self.fs.fsyncdir());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.fs.requests().count(Op::Statfs);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Setxattr);
        reply_empty(reply, self.fs.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.fs.requests().count(Op::Getxattr);
        match self.fs.getxattr(ino.0, name) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.fs.requests().count(Op::Listxattr);
        match self.fs.listxattr(ino.0) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.fs.requests().count(Op::Removexattr);
        reply_empty(reply, self.fs.removexattr(ino.0, name));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.fs.requests().count(Op::Access);
        reply_empty(reply, self.fs.access(ino.0, mask.bits(), ctx(req)));
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.fs.requests().count(Op::Ioctl);
        reply.error(FErrno::from_i32(libc::ENOTTY));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.fs.requests().count(Op::Fallocate);
        reply_empty(reply, self.fs.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        self.fs.requests().count(Op::Lseek);
        // Only SEEK_DATA and SEEK_HOLE come here (the kernel does the rest), for every kind
        // of handle: Linux has no passthrough for lseek.
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.fs.requests().count(Op::CopyFileRange);
        // ENOSYS: the kernel falls back to an ordinary read/write copy.
        reply.error(FErrno::ENOSYS);
    }

    fn bmap(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _blocksize: u32,
        _idx: u64,
        reply: fuser::ReplyBmap,
    ) {
        self.fs.requests().count(Op::Bmap);
        reply.error(FErrno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        self.fs.requests().count(Op::Poll);
        reply.error(FErrno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.fs.requests().count(Op::Create);
        let c = ctx(req);
        match self
            .fs
            .create_nowait(parent.0, name, mode, flags, c, Some(&CreateReg(&reply)))
        {
            Err(e) if e == Errno::WOULD_BLOCK => {
                // The name exists and its content must be downloaded first (an open for
                // writing without O_TRUNC): wait off the request threads, as `open` does.
                let (fs, name) = (self.fs.clone(), name.to_owned());
                spawn_waiter("kcache-create", move || {
                    let res = fs.create(parent.0, &name, mode, flags, c, Some(&CreateReg(&reply)));
                    reply_create(&fs, reply, res);
                });
            }
            res => reply_create(&self.fs, reply, res),
        }
    }
}

/// Invalidates kernel dentries and inodes through fuser's notifier (used after eviction,
/// from a daemon thread, never from inside a request handler).
pub struct NotifierCache(pub fuser::Notifier);

impl crate::core::KernelCache for NotifierCache {
    fn name_gone(&self, parent: u64, name: &OsStr, ino: u64) {
        // ENOENT just means the kernel had nothing cached.
        let _ = self.0.inval_entry(INodeNo(parent), name);
        let _ = self.0.inval_inode(INodeNo(ino), 0, 0);
    }
}

fn reply_empty(reply: ReplyEmpty, r: crate::error::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(ferr(e)),
    }
}

impl KcacheFuse {
    fn reply_entry(&self, reply: ReplyEntry, r: crate::error::Result<Attr>) {
        match r {
            Ok(a) => reply.entry(&self.fs.ttl(), &fattr(&a), Generation(0)),
            Err(e) => reply.error(ferr(e)),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(FErrno::ERANGE);
    } else {
        reply.data(v);
    }
}
