//! One open /dev/fuse connection: reading requests, writing replies and notifications,
//! cloning per-thread descriptors, and registering passthrough backing files.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::abi;
use super::reply::{out_header, Reply};

/// A /dev/fuse descriptor of the connection (the one mount(2) took, or a clone of it).
pub struct Dev {
    fd: OwnedFd,
}

impl Dev {
    /// Opens /dev/fuse for a new connection.
    pub fn open() -> io::Result<Dev> {
        // SAFETY: a plain open(2) of a constant path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("opening /dev/fuse: {e}")));
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        Ok(Dev {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// A `Dev` over any descriptor, for unit tests of code that only carries one.
    #[cfg(test)]
    pub(crate) fn from_fd(fd: OwnedFd) -> Dev {
        Dev { fd }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A second descriptor on the same connection, so each request thread has a queue of
    /// its own in the kernel (FUSE_DEV_IOC_CLONE).
    pub fn clone_dev(&self) -> io::Result<Dev> {
        let d = Dev::open()?;
        let src: u32 = self.raw() as u32;
        // SAFETY: the ioctl reads one u32 from the pointer, which lives across the call.
        let r = unsafe { libc::ioctl(d.raw(), abi::ioctl::CLONE as _, &src) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(d)
    }

    /// Reads one request into `buf`; `Ok(None)` once the connection is gone (unmounted).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Interrupted, or a request the kernel withdrew before we read it.
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                Some(libc::ENODEV) => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Answers request `unique`. ENOENT means the kernel no longer waits for it (the
    /// request was interrupted and abandoned): not an error of ours.
    pub fn reply(&self, unique: u64, r: &Reply) -> io::Result<()> {
        let h = r.header(unique);
        self.writev(&[&h, &r.body])
    }

    /// Sends a notification (unique 0, the code in the error field).
    pub fn notify(&self, code: i32, body: &[&[u8]]) -> io::Result<()> {
        let len: usize = body.iter().map(|b| b.len()).sum();
        let h = out_header(0, code, len);
        let mut parts: Vec<&[u8]> = vec![&h];
        parts.extend_from_slice(body);
        self.writev(&parts)
    }

    fn writev(&self, parts: &[&[u8]]) -> io::Result<()> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            })
            .collect();
        loop {
            // SAFETY: every iovec points into a live slice of `parts`.
            let n = unsafe { libc::writev(self.raw(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOENT) => return Ok(()),
                _ => return Err(e),
            }
        }
    }

    /// Registers `file` as a passthrough backing file (FUSE_DEV_IOC_BACKING_OPEN).
    pub fn open_backing(self: &Arc<Self>, file: &File) -> io::Result<BackingId> {
        // struct fuse_backing_map { int32_t fd; uint32_t flags; uint64_t padding; }
        let mut map = [0u8; 16];
        map[0..4].copy_from_slice(&file.as_raw_fd().to_ne_bytes());
        // SAFETY: the ioctl reads 16 bytes from `map`, which lives across the call.
        let id = unsafe { libc::ioctl(self.raw(), abi::ioctl::BACKING_OPEN as _, map.as_ptr()) };
        if id < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BackingId {
            dev: self.clone(),
            id: id as u32,
        })
    }

    /// Tells the kernel to forget the dentry `name` in `parent`.
    pub fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        let name = name.as_bytes();
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(&parent.to_ne_bytes());
        h[8..12].copy_from_slice(&(name.len() as u32).to_ne_bytes());
        self.notify(abi::notify::INVAL_ENTRY, &[&h, name, &[0]])
    }

    /// Tells the kernel to drop its cached attributes and pages of `ino`.
    pub fn inval_inode(&self, ino: u64) -> io::Result<()> {
        self.inval_inode_from(ino, 0)
    }

    /// Like `inval_inode` for the attributes only: with no pages to drop the kernel takes no
    /// page lock, so a request handler may send it.
    pub fn inval_attrs(&self, ino: u64) -> io::Result<()> {
        self.inval_inode_from(ino, -1)
    }

    /// FUSE_NOTIFY_INVAL_INODE: attributes, and pages from `offset` to the end (none when
    /// negative).
    fn inval_inode_from(&self, ino: u64, offset: i64) -> io::Result<()> {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&ino.to_ne_bytes());
        b[8..16].copy_from_slice(&offset.to_ne_bytes());
        self.notify(abi::notify::INVAL_INODE, &[&b])
    }
}

/// A kernel passthrough registration; dropping it unregisters the backing file.
pub struct BackingId {
    dev: Arc<Dev>,
    pub id: u32,
}

impl Drop for BackingId {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 from the pointer, which lives across the call.
        let r = unsafe { libc::ioctl(self.dev.raw(), abi::ioctl::BACKING_CLOSE as _, &self.id) };
        if r != 0 {
            tracing::debug!(id = self.id, error = %io::Error::last_os_error(), "closing a backing id");
        }
    }
}
