//! The one dispatch path: a decoded FUSE request becomes a `KcacheFs` call and its result a
//! `Reply`, whichever transport carried it. No filesystem logic lives here.
//!
//! Locks: FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS are deliberately not requested, so the kernel
//! itself implements flock(2) and fcntl(2) byte-range locks for this mount. They then exclude
//! across every process using the mount (in any mount namespace, since they hang off the one
//! kernel inode) and die with their holder, which is what pip, huggingface_hub, cargo and
//! SQLite rely on.
//!
//! Panics: a handler that panics must neither kill the transport thread it runs on nor leave
//! its caller waiting until the connection is aborted. `guarded` catches the panic and answers
//! EIO, and every `Responder` a request is given answers EIO if it is dropped unsent (a
//! waiter thread that panicked), so each request is answered exactly once either way.
//!
//! Passthrough: the kernel insists that all passthrough handles of one inode share a backing
//! file and that passthrough and page-cached handles never coexist on an inode. `KcacheFs`
//! picks modes that respect this; a refused registration falls back to daemon-served I/O.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::abi::{self, fattr, fopen, init};
use super::dev::{BackingId, Dev};
use super::reply::{self, DirBuf, Reply, Writer};
use super::request::{decode, InHeader, Operation};
use crate::core::{Attr, Backing, BackingToken, Ctx, IoMode, KcacheFs, Opened, SetAttrIn, TimeSet};
use crate::error::{Errno, Result};
use crate::requests::Op;

/// Answers a request later, from another thread, on the transport it came from.
pub trait Responder: Send {
    fn send(self: Box<Self>, r: Reply);
}

/// What became of a request.
pub enum Handled {
    /// Answer it now.
    Now(Reply),
    /// A responder took it and answers once the wait is over.
    Later,
    /// Nothing to answer (FORGET).
    Silent,
}

/// What FUSE_INIT settled.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    pub minor: u32,
    pub uring: bool,
    pub max_write: u32,
    pub max_pages: u16,
}

/// Dispatches one mount's requests into its filesystem.
pub struct Dispatcher {
    fs: Arc<KcacheFs>,
    dev: Arc<Dev>,
    want_passthrough: bool,
}

/// Registers backing files on the connection's /dev/fuse.
struct DevBacking<'a>(&'a Arc<Dev>);

impl Backing for DevBacking<'_> {
    fn register(&self, file: &File) -> std::io::Result<BackingToken> {
        Ok(Arc::new(self.0.open_backing(file)?))
    }
}

/// The largest write (and read) the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

fn ctx(h: &InHeader) -> Ctx {
    Ctx {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
    }
}

/// What a panic said, for the log.
fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs `f` (which answers a request) on a thread of its own; if no thread can be made,
/// runs it here rather than leave the request unanswered. If `f` panics, the responder it
/// owns answers EIO as it is dropped (`Guarded`); the panic is caught only to be logged.
fn spawn_waiter(name: &str, f: impl FnOnce() + Send + 'static) {
    let f = Arc::new(std::sync::Mutex::new(Some(f)));
    let g = f.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let f = g.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = f {
                if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
                    tracing::error!(
                        panic = panic_message(&*p),
                        "a waiting request's handler panicked"
                    );
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a waiting request; waiting on a request thread");
        if let Some(f) = f.lock().unwrap_or_else(|p| p.into_inner()).take() {
            f()
        }
    }
}

/// A responder that answers exactly once: by `send`, or with EIO when it is dropped unsent
/// (its owner panicked or forgot it), so a request that waits is never left unanswered.
struct Guarded {
    inner: Option<Box<dyn Responder>>,
    opcode: u32,
    unique: u64,
}

impl Responder for Guarded {
    fn send(mut self: Box<Self>, r: Reply) {
        if let Some(inner) = self.inner.take() {
            inner.send(r);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            tracing::error!(
                opcode = self.opcode,
                unique = self.unique,
                panicking = std::thread::panicking(),
                "a waiting request was dropped unanswered; answering EIO"
            );
            inner.send(Reply::err(Errno::EIO));
        }
    }
}

/// Runs `handle` (one request's handler) so that a panic in it becomes an EIO answer instead
/// of the end of the transport thread: logged with the opcode and unique id, then answered
/// here unless a responder was already made for the request (that responder answers EIO when
/// the unwinding drops it, and answering twice would commit a ring entry twice). FORGETs have
/// no answer. Every responder handed out is `Guarded`, for panics on waiter threads.
pub fn guarded(
    h: &InHeader,
    later: &mut dyn FnMut() -> Box<dyn Responder>,
    handle: impl FnOnce(&mut dyn FnMut() -> Box<dyn Responder>) -> Handled,
) -> Handled {
    let (opcode, unique) = (h.opcode, h.unique);
    let mut made = false;
    let mut guarded_later = || -> Box<dyn Responder> {
        made = true;
        Box::new(Guarded {
            inner: Some(later()),
            opcode,
            unique,
        })
    };
    let r = catch_unwind(AssertUnwindSafe(|| handle(&mut guarded_later)));
    match r {
        Ok(handled) => handled,
        Err(p) => {
            tracing::error!(
                opcode,
                unique,
                panic = panic_message(&*p),
                "request handler panicked; answering EIO"
            );
            if made {
                Handled::Later
            } else if matches!(opcode, abi::opcode::FORGET | abi::opcode::BATCH_FORGET) {
                Handled::Silent
            } else {
                Handled::Now(Reply::err(Errno::EIO))
            }
        }
    }
}

fn open_flags(mode: &IoMode) -> u32 {
    match mode {
        IoMode::Passthrough(_) => fopen::PASSTHROUGH,
        IoMode::Cached { keep_cache: true } => fopen::KEEP_CACHE,
        IoMode::Cached { keep_cache: false } => 0,
        // A direct handle uses no page cache, so it usually has no reason to make the kernel
        // drop the inode's pages at open (what an open without KEEP_CACHE does): other
        // handles' pages hold writes still on their way to the daemon, and a page dropped and
        // read back before one arrives would be cached short (see `OpenInode::open_handle`).
        // The exception is the first direct writer, which drops them on purpose (no cached
        // handle is open then).
        IoMode::Direct { keep_cache: true } => fopen::DIRECT_IO | fopen::KEEP_CACHE,
        IoMode::Direct { keep_cache: false } => fopen::DIRECT_IO,
    }
}

/// fuse_open_out for an opened handle.
fn open_out(w: &mut Writer, o: &Opened) -> Result<()> {
    let backing = match &o.mode {
        IoMode::Passthrough(t) => t.downcast_ref::<BackingId>().ok_or(Errno::EIO)?.id as i32,
        _ => 0,
    };
    reply::open_out(w, o.fh, open_flags(&o.mode), backing);
    Ok(())
}

fn open_reply(r: Result<Opened>) -> Reply {
    let mut w = Writer::with_capacity(abi::OPEN_OUT_LEN);
    Reply::from(r.and_then(|o| open_out(&mut w, &o)).map(|()| w.0))
}

fn create_reply(fs: &KcacheFs, r: Result<(Attr, Opened)>) -> Reply {
    let mut w = Writer::with_capacity(abi::ENTRY_OUT_LEN + abi::OPEN_OUT_LEN);
    Reply::from(
        r.and_then(|(a, o)| {
            reply::entry(&mut w, fs.ttl(), Some(&a));
            open_out(&mut w, &o)
        })
        .map(|()| w.0),
    )
}

fn empty(r: Result<()>) -> Reply {
    Reply::from(r.map(|()| Vec::new()))
}

fn xattr_reply(size: u32, r: Result<Vec<u8>>) -> Reply {
    match r {
        Ok(v) if size == 0 => Reply::ok(reply::xattr_size_reply(v.len() as u32)),
        Ok(v) if v.len() > size as usize => Reply::err(Errno(libc::ERANGE)),
        r => Reply::from(r),
    }
}

fn counted(op: &Operation) -> Option<Op> {
    use abi::opcode;
    Some(match op {
        Operation::Lookup(_) => Op::Lookup,
        Operation::Forget(_) | Operation::BatchForget(_) => Op::Forget,
        Operation::Getattr => Op::Getattr,
        Operation::Setattr(_) => Op::Setattr,
        Operation::Readlink => Op::Readlink,
        Operation::Symlink(..) => Op::Symlink,
        Operation::Mknod(..) => Op::Mknod,
        Operation::Mkdir(..) => Op::Mkdir,
        Operation::Unlink(_) => Op::Unlink,
        Operation::Rmdir(_) => Op::Rmdir,
        Operation::Rename { .. } => Op::Rename,
        Operation::Link(..) => Op::Link,
        Operation::Open(..) => Op::Open,
        Operation::Read { .. } => Op::Read,
        Operation::Write { .. } => Op::Write,
        Operation::Statfs => Op::Statfs,
        Operation::Release(_) => Op::Release,
        Operation::Fsync(_) => Op::Fsync,
        Operation::Setxattr { .. } => Op::Setxattr,
        Operation::Getxattr(..) => Op::Getxattr,
        Operation::Listxattr(_) => Op::Listxattr,
        Operation::Removexattr(_) => Op::Removexattr,
        Operation::Flush => Op::Flush,
        Operation::Opendir => Op::Opendir,
        Operation::Readdir { plus: false, .. } => Op::Readdir,
        Operation::Readdir { plus: true, .. } => Op::Readdirplus,
        Operation::Releasedir => Op::Releasedir,
        Operation::Fsyncdir => Op::Fsyncdir,
        Operation::Access(_) => Op::Access,
        Operation::Create { .. } => Op::Create,
        Operation::Fallocate { .. } => Op::Fallocate,
        Operation::Lseek { .. } => Op::Lseek,
        Operation::Other(opcode::IOCTL) => Op::Ioctl,
        Operation::Other(opcode::COPY_FILE_RANGE) => Op::CopyFileRange,
        Operation::Other(opcode::BMAP) => Op::Bmap,
        Operation::Other(opcode::POLL) => Op::Poll,
        _ => return None,
    })
}

impl Dispatcher {
    pub fn new(fs: Arc<KcacheFs>, dev: Arc<Dev>, want_passthrough: bool) -> Dispatcher {
        Dispatcher {
            fs,
            dev,
            want_passthrough,
        }
    }

    pub fn fs(&self) -> &Arc<KcacheFs> {
        &self.fs
    }

    /// Answers FUSE_INIT: what kcache asks of the kernel given what it offers. `uring`:
    /// whether to ask for FUSE over io_uring (when the kernel offers it).
    pub fn init(
        &self,
        op: &Operation,
        uring: bool,
    ) -> std::result::Result<(Reply, Negotiated), Reply> {
        let Operation::Init {
            major,
            minor,
            max_readahead,
            flags: offered,
        } = *op
        else {
            return Err(Reply::err(Errno::EIO));
        };
        if major > abi::KERNEL_VERSION {
            // A newer major version: answer with ours only; the kernel then retries.
            let mut w = Writer::with_capacity(8);
            w.u32(abi::KERNEL_VERSION).u32(abi::KERNEL_MINOR_VERSION);
            let n = Negotiated {
                minor: 0,
                uring: false,
                max_write: 0,
                max_pages: 0,
            };
            return Ok((Reply::ok(w.0), n));
        }
        if major < abi::KERNEL_VERSION || minor < abi::MIN_MINOR_VERSION {
            tracing::error!(
                major,
                minor,
                "kernel FUSE protocol too old (kcache needs 7.31)"
            );
            return Err(Reply::err(Errno(libc::EPROTO)));
        }
        let mut want = init::ASYNC_READ
            | init::BIG_WRITES
            | init::MAX_PAGES
            | init::DO_READDIRPLUS
            | init::READDIRPLUS_AUTO
            | init::PARALLEL_DIROPS
            | init::ATOMIC_O_TRUNC
            | init::CACHE_SYMLINKS
            | init::DIRECT_IO_ALLOW_MMAP
            | init::ASYNC_DIO
            | init::HANDLE_KILLPRIV_V2
            | init::INIT_EXT;
        let mut mode = "userspace reads with the kernel page cache";
        let mut stack_depth = 0;
        if self.want_passthrough {
            if offered & init::PASSTHROUGH != 0 {
                want |= init::PASSTHROUGH;
                stack_depth = 1;
                self.fs.set_passthrough(true);
                mode = "kernel passthrough";
            } else {
                mode =
                    "userspace reads with the kernel page cache (kernel has no FUSE passthrough)";
            }
        }
        if uring {
            want |= init::OVER_IO_URING;
        }
        let flags = want & offered;
        let max_pages = (MAX_WRITE / 4096) as u16;
        let mut w = Writer::with_capacity(abi::INIT_OUT_LEN);
        w.u32(abi::KERNEL_VERSION)
            .u32(minor.min(abi::KERNEL_MINOR_VERSION))
            .u32(max_readahead.min(1 << 20))
            .u32(flags as u32)
            .u16(64) // max_background
            .u16(48) // congestion_threshold
            .u32(MAX_WRITE)
            .u32(1) // time_gran: nanoseconds
            .u16(max_pages)
            .u16(0) // map_alignment
            .u32((flags >> 32) as u32)
            .u32(stack_depth);
        w.zeros(abi::INIT_OUT_LEN - w.0.len());
        tracing::info!(io = mode, "fuse session initialised");
        Ok((
            Reply::ok(w.0),
            Negotiated {
                minor,
                uring: flags & init::OVER_IO_URING != 0,
                max_write: MAX_WRITE,
                max_pages,
            },
        ))
    }

    /// Handles one request (not INIT). `later` makes a responder for an answer that must
    /// wait (content still downloading); it is called at most once. A panic in the handler
    /// is answered EIO (`guarded`), so the calling transport thread keeps serving.
    pub fn handle(
        &self,
        h: &InHeader,
        op_in: &[u8],
        payload: &[u8],
        later: &mut dyn FnMut() -> Box<dyn Responder>,
    ) -> Handled {
        guarded(h, later, |later| {
            self.handle_unguarded(h, op_in, payload, later)
        })
    }

    fn handle_unguarded(
        &self,
        h: &InHeader,
        op_in: &[u8],
        payload: &[u8],
        later: &mut dyn FnMut() -> Box<dyn Responder>,
    ) -> Handled {
        #[cfg(test)]
        if tests::PANIC_ON.with(|p| p.get()) == h.opcode {
            panic!("test hook: handler panics");
        }
        let op = match decode(h, op_in, payload) {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!(opcode = h.opcode, unique = h.unique, "malformed request");
                return Handled::Now(Reply::err(e));
            }
        };
        if let Some(c) = counted(&op) {
            self.fs.requests().count(c);
        }
        let fs = &self.fs;
        let ino = h.nodeid;
        let ttl = fs.ttl();
        let entry = |r: Result<Attr>| Reply::from(r.map(|a| reply::entry_reply(ttl, Some(&a))));
        Handled::Now(match op {
            Operation::Forget(n) => {
                fs.forget(ino, n);
                return Handled::Silent;
            }
            Operation::BatchForget(v) => {
                for (i, n) in v {
                    fs.forget(i, n);
                }
                return Handled::Silent;
            }
            // Interrupts are not acted on (every wait is bounded or on a thread of its own);
            // ENOSYS tells the kernel to stop sending them.
            Operation::Interrupt => Reply::err(Errno::ENOSYS),
            Operation::Init { .. } => Reply::err(Errno::EIO),
            Operation::Destroy => {
                fs.flush_all();
                Reply::empty()
            }
            Operation::Lookup(name) => match fs.lookup(ino, name) {
                Ok(a) => Reply::ok(reply::entry_reply(ttl, Some(&a))),
                // A negative entry with the same long TTL: every create goes through us, and
                // the kernel drops the negative dentry when it does.
                Err(e) if e == Errno::ENOENT => Reply::ok(reply::entry_reply(ttl, None)),
                Err(e) => Reply::err(e),
            },
            Operation::Getattr => Reply::from(fs.getattr(ino).map(|a| reply::attr_reply(ttl, &a))),
            Operation::Setattr(s) => {
                let t = |now: u32, set: u32, (sec, nsec): (u64, u32)| {
                    if s.valid & now != 0 {
                        Some(TimeSet::Now)
                    } else if s.valid & set != 0 {
                        Some(TimeSet::At(
                            (sec as i64)
                                .saturating_mul(1_000_000_000)
                                .saturating_add(nsec as i64),
                        ))
                    } else {
                        None
                    }
                };
                let a = SetAttrIn {
                    mode: (s.valid & fattr::MODE != 0).then_some(s.mode),
                    uid: (s.valid & fattr::UID != 0).then_some(s.uid),
                    gid: (s.valid & fattr::GID != 0).then_some(s.gid),
                    size: (s.valid & fattr::SIZE != 0).then_some(s.size),
                    atime: t(fattr::ATIME_NOW, fattr::ATIME, s.atime),
                    mtime: t(fattr::MTIME_NOW, fattr::MTIME, s.mtime),
                    kill_suidgid: s.valid & fattr::KILL_SUIDGID != 0,
                };
                Reply::from(fs.setattr(ino, &a).map(|a| reply::attr_reply(ttl, &a)))
            }
            Operation::Readlink => Reply::from(fs.readlink(ino)),
            Operation::Mknod(name, mode, rdev) => entry(fs.mknod(ino, name, mode, rdev, ctx(h))),
            Operation::Mkdir(name, mode) => entry(fs.mkdir(ino, name, mode, ctx(h))),
            Operation::Unlink(name) => empty(fs.unlink(ino, name)),
            Operation::Rmdir(name) => empty(fs.rmdir(ino, name)),
            Operation::Symlink(name, target) => entry(fs.symlink(ino, name, target, ctx(h))),
            Operation::Rename {
                name,
                newdir,
                newname,
                flags,
            } => empty(fs.rename(ino, name, newdir, newname, flags)),
            Operation::Link(old, newname) => entry(fs.link(old, ino, newname)),
            Operation::Open(flags, kill_suidgid) => {
                // Before the open (an O_TRUNC open by a caller without CAP_FSETID): a failed
                // kill refuses the open and leaves no handle behind.
                if kill_suidgid {
                    if let Err(e) = fs.kill_suidgid(ino) {
                        return Handled::Now(Reply::err(e));
                    }
                }
                match fs.open_nowait(ino, flags, Some(&DevBacking(&self.dev))) {
                    Err(e) if e == Errno::WOULD_BLOCK => {
                        // The content must be downloaded first: wait on a thread of our own,
                        // so the request threads stay free (local files stay fast).
                        let (fs, dev, pid, r) = (fs.clone(), self.dev.clone(), h.pid, later());
                        spawn_waiter("kcache-open", move || {
                            r.send(open_reply(fs.open_for(
                                ino,
                                flags,
                                Some(&DevBacking(&dev)),
                                pid,
                            )))
                        });
                        return Handled::Later;
                    }
                    res => open_reply(res),
                }
            }
            Operation::Read { fh, offset, size } => match fs.read_nowait(fh, offset, size) {
                Err(e) if e == Errno::WOULD_BLOCK => {
                    // Part of a file still downloading: wait for it off the request threads.
                    let (fs, r) = (fs.clone(), later());
                    spawn_waiter("kcache-read", move || {
                        r.send(Reply::from(fs.read(fh, offset, size)))
                    });
                    return Handled::Later;
                }
                res => Reply::from(res),
            },
            Operation::Write {
                fh,
                offset,
                data,
                kill_suidgid,
            } => {
                // Killed before the bytes land, as the kernel itself would; a failed kill
                // refuses the write.
                let killed = if kill_suidgid {
                    fs.kill_suidgid_fh(fh)
                } else {
                    Ok(())
                };
                Reply::from(
                    killed.and_then(|()| fs.write(fh, offset, data).map(reply::write_reply)),
                )
            }
            // Nothing to do at close(2): writes are already in the staging file and commits
            // happen at release. ENOSYS tells the kernel to stop sending FLUSH, saving a round
            // trip on every close.
            Operation::Flush => Reply::err(Errno::ENOSYS),
            Operation::Release(fh) => empty(fs.release(fh)),
            Operation::Fsync(fh) => empty(fs.fsync(fh)),
            Operation::Opendir => {
                let mut w = Writer::with_capacity(abi::OPEN_OUT_LEN);
                reply::open_out(&mut w, 0, 0, 0);
                Reply::ok(w.0)
            }
            Operation::Releasedir => Reply::empty(),
            Operation::Readdir { offset, size, plus } => {
                let mut d = DirBuf::new(size);
                let r = fs.readdir(ino, offset, plus, |ino, off, kind, name, attr| {
                    if plus {
                        d.add_plus(ino, off, kind, name, ttl, attr)
                    } else {
                        d.add(ino, off, kind, name)
                    }
                });
                Reply::from(r.map(|()| d.into_bytes()))
            }
            Operation::Fsyncdir => empty(fs.fsyncdir()),
            Operation::Statfs => Reply::from(fs.statfs().map(|s| reply::statfs_reply(&s))),
            Operation::Setxattr { name, value, flags } => {
                empty(fs.setxattr(ino, name, value, flags))
            }
            Operation::Getxattr(name, size) => xattr_reply(size, fs.getxattr(ino, name)),
            Operation::Listxattr(size) => xattr_reply(size, fs.listxattr(ino)),
            Operation::Removexattr(name) => empty(fs.removexattr(ino, name)),
            Operation::Access(mask) => empty(fs.access(ino, mask, ctx(h))),
            Operation::Create {
                name,
                mode,
                flags,
                kill_suidgid: kill,
            } => {
                let c = ctx(h);
                let backing = DevBacking(&self.dev);
                match fs.create_nowait(ino, name, mode, flags, c, kill, Some(&backing)) {
                    Err(e) if e == Errno::WOULD_BLOCK => {
                        // The name exists and its content must be downloaded first (an open
                        // for writing without O_TRUNC): wait off the request threads.
                        let (fs, dev, name, r) =
                            (fs.clone(), self.dev.clone(), name.to_owned(), later());
                        spawn_waiter("kcache-create", move || {
                            let backing = DevBacking(&dev);
                            let res = fs.create(ino, &name, mode, flags, c, kill, Some(&backing));
                            r.send(create_reply(&fs, res))
                        });
                        return Handled::Later;
                    }
                    res => create_reply(fs, res),
                }
            }
            Operation::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => empty(fs.fallocate(fh, offset, length, mode)),
            // Only SEEK_DATA and SEEK_HOLE come here (the kernel does the rest), for every
            // kind of handle: Linux has no passthrough for lseek.
            Operation::Lseek { fh, offset, whence } => {
                Reply::from(fs.lseek(fh, offset, whence).map(reply::lseek_reply))
            }
            Operation::Other(abi::opcode::IOCTL) => Reply::err(Errno(libc::ENOTTY)),
            // ENOSYS for the rest: copy_file_range falls back to read/write in the kernel,
            // bmap and poll are unsupported, and locks are the kernel's own.
            Operation::Other(_) => Reply::err(Errno::ENOSYS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::Mutex;

    thread_local! {
        /// The opcode whose handler panics on this thread (0: none), a hook into the real
        /// `Dispatcher::handle`.
        pub(super) static PANIC_ON: Cell<u32> = const { Cell::new(0) };
    }

    #[test]
    fn a_panic_in_the_dispatcher_s_handler_is_answered_eio() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(kcache_store::Store::open(dir.path()).unwrap());
        let vol = store.volume("default", true, 0, 0).unwrap();
        let fs = Arc::new(KcacheFs::new(store, vol, false));
        // No connection: nothing here writes to the device.
        let dev = Arc::new(Dev::from_fd(File::open("/dev/null").unwrap().into()));
        let d = Dispatcher::new(fs, dev, false);
        let mut later = || -> Box<dyn Responder> { unreachable!("nothing waits") };
        let mut h = header(abi::opcode::GETATTR);
        h.nodeid = crate::ROOT_INO;
        PANIC_ON.with(|p| p.set(abi::opcode::GETATTR));
        let r = d.handle(&h, &[0; 16], &[], &mut later);
        PANIC_ON.with(|p| p.set(0));
        assert_eq!(now_error(r), Some(-libc::EIO));
        // And the next request on this thread is served.
        let r = d.handle(&h, &[0; 16], &[], &mut later);
        assert_eq!(now_error(r), Some(0));
    }

    /// A responder that records the errors it was sent.
    struct Recorder(Arc<Mutex<Vec<i32>>>);

    impl Responder for Recorder {
        fn send(self: Box<Self>, r: Reply) {
            self.0.lock().unwrap().push(r.error);
        }
    }

    /// What deferred answers were sent (their errors), and a `later` that records into it.
    fn recorder() -> (Arc<Mutex<Vec<i32>>>, impl FnMut() -> Box<dyn Responder>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s = sent.clone();
        (sent, move || -> Box<dyn Responder> {
            Box::new(Recorder(s.clone()))
        })
    }

    fn header(opcode: u32) -> InHeader {
        InHeader {
            opcode,
            unique: 77,
            ..Default::default()
        }
    }

    fn now_error(h: Handled) -> Option<i32> {
        match h {
            Handled::Now(r) => Some(r.error),
            _ => None,
        }
    }

    #[test]
    fn a_panicking_handler_is_answered_eio_and_the_thread_goes_on() {
        let (sent, mut later) = recorder();
        let h = guarded(&header(abi::opcode::GETATTR), &mut later, |_| {
            panic!("handler bug")
        });
        assert_eq!(now_error(h), Some(-libc::EIO));
        // The same thread serves the next request normally.
        let h = guarded(&header(abi::opcode::GETATTR), &mut later, |_| {
            Handled::Now(Reply::empty())
        });
        assert_eq!(now_error(h), Some(0));
        assert!(sent.lock().unwrap().is_empty(), "no responder was made");
    }

    #[test]
    fn a_panicking_forget_is_not_answered() {
        let mut later = || -> Box<dyn Responder> { unreachable!() };
        let h = guarded(&header(abi::opcode::FORGET), &mut later, |_| panic!("bug"));
        assert!(matches!(h, Handled::Silent));
    }

    #[test]
    fn a_panic_after_taking_a_responder_is_answered_once_through_it() {
        let (sent, mut later) = recorder();
        let h = guarded(&header(abi::opcode::OPEN), &mut later, |later| {
            let _r = later();
            panic!("bug after deferring")
        });
        // Not answered on the transport as well: a ring entry must be committed once.
        assert!(matches!(h, Handled::Later));
        assert_eq!(*sent.lock().unwrap(), vec![-libc::EIO]);
    }

    #[test]
    fn a_waiter_thread_that_panics_answers_eio() {
        let (sent, mut later) = recorder();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = guarded(&header(abi::opcode::READ), &mut later, |later| {
            let r = later();
            spawn_waiter("test-waiter", move || {
                let _done = done_tx;
                let fail = true;
                if fail {
                    panic!("download waiter bug");
                }
                r.send(Reply::empty());
            });
            Handled::Later
        });
        assert!(matches!(h, Handled::Later));
        // The waiter's end (its captures dropped) closes the channel.
        let _ = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sent.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*sent.lock().unwrap(), vec![-libc::EIO]);
    }

    #[test]
    fn a_responder_that_sends_does_not_answer_again_when_dropped() {
        let (sent, mut later) = recorder();
        let h = guarded(&header(abi::opcode::READ), &mut later, |later| {
            later().send(Reply::empty());
            Handled::Later
        });
        assert!(matches!(h, Handled::Later));
        assert_eq!(*sent.lock().unwrap(), vec![0]);
    }
}
