//! The plain values the kernel side sees (who asks, attributes, setattr requests, statfs,
//! how a handle does I/O), the traits the FUSE adapter implements for the filesystem, and
//! the conversions from store rows and file metadata to attributes.

use std::any::Any;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use kcache_store::{Inode, Kind, NewNode};

use crate::error::{Errno, Result};

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Ctx {
    pub fn root() -> Ctx {
        Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
        }
    }
}

/// Attributes as the kernel sees them (inode number already translated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks the content takes on disk (st_blocks): the staging file's while
    /// staged, else the blob file's as measured when it became local; the size rounded up
    /// where it was never measured (blobs from before schema 5, never local).
    pub blocks: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub nlink: u32,
    pub rdev: u32,
}

impl Attr {
    /// The attributes a store row records, presented as kernel inode `ino` (the caller
    /// translates the number: only it knows the volume root).
    pub(crate) fn from_inode(inode: &Inode, ino: u64) -> Attr {
        Attr {
            ino,
            kind: inode.kind,
            perm: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            // Old rows (and blobs never local) have no figure: assume no holes.
            blocks: inode
                .blob_blocks
                .unwrap_or_else(|| inode.size.div_ceil(512)),
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            nlink: inode.nlink,
            rdev: inode.rdev,
        }
    }

    /// Overlays uncommitted staged content, described by its staging file's metadata: while
    /// staged, that file's size, blocks and mtime are the file's, and its ctime if later.
    pub(crate) fn overlay_staged(&mut self, meta: &std::fs::Metadata) {
        self.size = meta.len();
        self.blocks = meta.blocks();
        self.mtime = mtime_of(meta);
        self.ctime = self.ctime.max(ctime_of(meta));
    }
}

/// An opaque kernel passthrough registration of a backing file. Dropping it unregisters.
pub type BackingToken = Arc<dyn Any + Send + Sync>;

/// Registers files with the kernel for passthrough reads and writes. The FUSE adapter
/// implements it; tests without a mount pass `None`.
pub trait Backing {
    fn register(&self, file: &File) -> std::io::Result<BackingToken>;
}

/// Tells the kernel to drop what it caches about names the daemon removed on its own
/// (eviction). The FUSE adapter implements it with fuser's notifier.
pub trait KernelCache: Send + Sync {
    fn name_gone(&self, parent: u64, name: &OsStr, ino: u64);
    /// The daemon changed `ino`'s attributes where no reply carries them (setuid cleared on a
    /// write): the kernel must fetch them again before it trusts its copy (an exec would
    /// still see the old setuid bit). Attributes only, never pages, so it is safe from inside
    /// a request handler.
    fn attrs_changed(&self, ino: u64);
    /// `ino`'s content changed where the kernel's pages could not follow (direct writes while
    /// other handles, which may map the file, stay open): it must drop its cached pages. Takes
    /// page locks, so never from inside a request handler.
    fn pages_changed(&self, ino: u64);
}

/// How the kernel should do I/O on a handle.
#[derive(Clone)]
pub enum IoMode {
    /// The kernel reads and writes the backing file directly.
    Passthrough(BackingToken),
    /// Reads and writes come to the daemon; the kernel page cache is used (kept across opens
    /// when `keep_cache`).
    Cached { keep_cache: bool },
    /// Reads and writes come to the daemon, no page cache (see `OpenInode::open_handle` for
    /// who gets it). Without `keep_cache` the open also makes the kernel drop the inode's
    /// pages (the first direct writer's, so no page from before its writes outlives them).
    Direct { keep_cache: bool },
}

impl std::fmt::Debug for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoMode::Passthrough(_) => f.write_str("Passthrough"),
            IoMode::Cached { keep_cache } => write!(f, "Cached(keep_cache={keep_cache})"),
            IoMode::Direct { keep_cache } => write!(f, "Direct(keep_cache={keep_cache})"),
        }
    }
}

#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    pub mode: IoMode,
}

/// Changes requested by setattr.
#[derive(Clone, Debug, Default)]
pub struct SetAttrIn {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// Clear setuid/setgid and capabilities as a truncate or chown by this caller does
    /// (the kernel's FATTR_KILL_SUIDGID; see `KcacheFs::kill_suidgid`).
    pub kill_suidgid: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    Now,
    At(i64),
}

/// Filesystem statistics.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Nanoseconds since the epoch -> (seconds, nanoseconds), the nanoseconds always in
/// 0..1e9 (times before 1970 round the seconds down), as a timespec wants them.
pub(crate) fn ts(t: i64) -> (i64, i64) {
    (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000))
}

pub(crate) fn mtime_of(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

pub(crate) fn ctime_of(meta: &std::fs::Metadata) -> i64 {
    meta.ctime() * 1_000_000_000 + meta.ctime_nsec()
}

/// A new node for the store; its owner is filled in by whoever creates it.
pub(crate) fn new_node(kind: Kind, mode: u32, rdev: u32, target: Option<Vec<u8>>) -> NewNode {
    NewNode {
        kind,
        mode,
        uid: 0,
        gid: 0,
        rdev,
        target,
    }
}

/// The permission bits and group of a new entry of `kind` in `parent`, made by `ctx` with
/// `mode`.
pub(crate) fn new_node_owner(parent: &Inode, ctx: Ctx, kind: Kind, mode: u32) -> (u32, u32) {
    // BSD group semantics on setgid directories: new entries take the directory's group,
    // and new subdirectories inherit the setgid bit.
    let mut mode = mode & 0o7777;
    let gid = if parent.mode & libc::S_ISGID != 0 {
        if kind == Kind::Dir {
            mode |= libc::S_ISGID;
        }
        parent.gid
    } else {
        ctx.gid
    };
    (mode, gid)
}

/// access(2) by mode bits on inode `n` (only asked when the kernel does not check
/// permissions itself).
pub(crate) fn access_by_mode(n: &Inode, mask: i32, ctx: Ctx, read_only: bool) -> Result<()> {
    if mask == libc::F_OK {
        return Ok(());
    }
    if mask & libc::W_OK != 0 && read_only {
        return Err(Errno::EROFS);
    }
    if ctx.uid == 0 {
        // Root may do anything except execute a file nobody may execute.
        if mask & libc::X_OK != 0 && n.kind != Kind::Dir && n.mode & 0o111 == 0 {
            return Err(Errno::EACCES);
        }
        return Ok(());
    }
    let bits = if ctx.uid == n.uid {
        (n.mode >> 6) & 7
    } else if ctx.gid == n.gid {
        (n.mode >> 3) & 7
    } else {
        n.mode & 7
    };
    if (mask as u32) & !bits & 7 != 0 {
        return Err(Errno::EACCES);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Inode {
        Inode {
            ino: 42,
            volume: 1,
            kind: Kind::File,
            mode: 0o104755,
            uid: 1000,
            gid: 100,
            size: 1025,
            atime: 1,
            mtime: 2,
            ctime: 3,
            nlink: 2,
            rdev: 0,
            parent: Some(7),
            blob: None,
            blob_blocks: None,
            target: None,
        }
    }

    #[test]
    fn ts_splits_nanoseconds_and_keeps_them_positive() {
        assert_eq!(ts(0), (0, 0));
        assert_eq!(ts(1_500_000_000), (1, 500_000_000));
        assert_eq!(ts(-1), (-1, 999_999_999));
        assert_eq!(ts(-1_000_000_000), (-1, 0));
    }

    #[test]
    fn times_of_metadata_are_nanoseconds() {
        let f = tempfile::tempfile().unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(
            mtime_of(&meta),
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
        );
        assert_eq!(
            ctime_of(&meta),
            meta.ctime() * 1_000_000_000 + meta.ctime_nsec()
        );
        assert_eq!(ts(mtime_of(&meta)), (meta.mtime(), meta.mtime_nsec()));
    }

    #[test]
    fn attr_from_row_masks_mode_and_rounds_blocks_up() {
        let a = Attr::from_inode(&row(), 9);
        assert_eq!(a.ino, 9);
        assert_eq!(a.perm, 0o4755);
        assert_eq!((a.uid, a.gid, a.nlink), (1000, 100, 2));
        assert_eq!((a.atime, a.mtime, a.ctime), (1, 2, 3));
        // Never measured: the size in 512-byte blocks, rounded up.
        assert_eq!(a.blocks, 3);
        let measured = Inode {
            blob_blocks: Some(1),
            ..row()
        };
        assert_eq!(Attr::from_inode(&measured, 9).blocks, 1);
    }

    #[test]
    fn staged_overlay_takes_size_and_mtime_and_the_later_ctime() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(5000).unwrap();
        let meta = f.metadata().unwrap();
        let mut a = Attr::from_inode(&row(), 9);
        a.overlay_staged(&meta);
        assert_eq!(a.size, 5000);
        assert_eq!(a.blocks, meta.blocks());
        assert_eq!(a.mtime, mtime_of(&meta));
        assert_eq!(a.ctime, ctime_of(&meta));
        // A row ctime later than the staging file's stays.
        let mut later = Attr::from_inode(
            &Inode {
                ctime: i64::MAX,
                ..row()
            },
            9,
        );
        later.overlay_staged(&meta);
        assert_eq!(later.ctime, i64::MAX);
    }

    fn who(uid: u32, gid: u32) -> Ctx {
        Ctx { uid, gid, pid: 0 }
    }

    #[test]
    fn new_entries_in_setgid_directories_take_its_group_and_subdirectories_its_bit() {
        let plain = Inode {
            kind: Kind::Dir,
            mode: 0o755,
            gid: 50,
            ..row()
        };
        assert_eq!(
            new_node_owner(&plain, who(1, 7), Kind::File, libc::S_IFREG | 0o644),
            (0o644, 7)
        );
        let setgid = Inode {
            mode: 0o2775,
            ..plain
        };
        assert_eq!(
            new_node_owner(&setgid, who(1, 7), Kind::File, 0o644),
            (0o644, 50)
        );
        assert_eq!(
            new_node_owner(&setgid, who(1, 7), Kind::Dir, 0o755),
            (0o2755, 50)
        );
        let n = new_node(Kind::Symlink, 0o777, 0, Some(b"t".to_vec()));
        assert_eq!((n.uid, n.gid, n.mode), (0, 0, 0o777));
    }

    #[test]
    fn access_checks_the_owner_group_or_other_bits() {
        let f = Inode {
            mode: 0o640,
            uid: 1000,
            gid: 100,
            ..row()
        };
        let check = |mask, ctx| access_by_mode(&f, mask, ctx, false);
        assert_eq!(check(libc::R_OK | libc::W_OK, who(1000, 1)), Ok(()));
        assert_eq!(check(libc::X_OK, who(1000, 1)), Err(Errno::EACCES));
        assert_eq!(check(libc::R_OK, who(2000, 100)), Ok(()));
        assert_eq!(check(libc::W_OK, who(2000, 100)), Err(Errno::EACCES));
        assert_eq!(check(libc::R_OK, who(2000, 1)), Err(Errno::EACCES));
        assert_eq!(check(libc::F_OK, who(2000, 1)), Ok(()));
        // Root passes every check but executing what nobody may execute.
        assert_eq!(check(libc::R_OK | libc::W_OK, Ctx::root()), Ok(()));
        assert_eq!(check(libc::X_OK, Ctx::root()), Err(Errno::EACCES));
        let dir = Inode {
            kind: Kind::Dir,
            ..f.clone()
        };
        assert_eq!(access_by_mode(&dir, libc::X_OK, Ctx::root(), false), Ok(()));
        // A read-only mount refuses writing to anyone, before the bits.
        assert_eq!(
            access_by_mode(&f, libc::W_OK, Ctx::root(), true),
            Err(Errno::EROFS)
        );
        assert_eq!(access_by_mode(&f, libc::R_OK, who(1000, 1), true), Ok(()));
    }

    #[test]
    fn io_mode_debug_hides_the_token() {
        let token: BackingToken = Arc::new(());
        assert_eq!(format!("{:?}", IoMode::Passthrough(token)), "Passthrough");
        assert_eq!(
            format!("{:?}", IoMode::Cached { keep_cache: true }),
            "Cached(keep_cache=true)"
        );
        assert_eq!(
            format!("{:?}", IoMode::Direct { keep_cache: true }),
            "Direct(keep_cache=true)"
        );
    }
}
