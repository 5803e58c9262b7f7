//! The filesystem's error: an errno for the caller; logging happens where it is made.

use kcache_store::Error as StoreError;

/// An errno to hand back to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    /// Not for the kernel: the `*_nowait` calls answer this when the operation would wait
    /// for a download; the adapter then repeats it on a thread of its own.
    pub const WOULD_BLOCK: Errno = Errno(libc::EWOULDBLOCK);
    /// Not for the kernel: an open for writing found the inode served to readers by kernel
    /// passthrough, which the kernel lets no other kind of handle join; the open waits for
    /// those readers to close.
    pub const PASSTHROUGH_HELD: Errno = Errno(libc::EBUSY);
}

impl From<StoreError> for Errno {
    fn from(e: StoreError) -> Errno {
        let errno = e.errno();
        // Expected outcomes (ENOENT, EEXIST, ...) are answers, not failures; only log what an
        // operator must see: damaged blobs, I/O and database errors. A halted store logged
        // its cause once; each change it refuses after that is no news.
        let halted = matches!(e, StoreError::Halted(_));
        if (errno == libc::EIO && !halted) || matches!(e, StoreError::BadBlob { .. }) {
            tracing::error!(error = %e, "store error");
        }
        Errno(errno)
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        if errno == libc::EIO {
            tracing::error!(error = %e, "i/o error");
        }
        Errno(match errno {
            libc::EDQUOT => libc::ENOSPC,
            e => e,
        })
    }
}

pub type Result<T> = std::result::Result<T, Errno>;
