//! Encodes answers to FUSE requests: a `Reply` is an errno or the bytes that follow the out
//! header, the same for both transports (each frames it its own way).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use kcache_store::Kind;

use super::abi;
use crate::core::{Attr, StatFs};
use crate::error::Errno;

/// An answer: `error` is 0 or a negative errno; `body` follows the out header.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub error: i32,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(body: Vec<u8>) -> Reply {
        Reply { error: 0, body }
    }

    pub fn empty() -> Reply {
        Reply::default()
    }

    pub fn err(e: Errno) -> Reply {
        // An errno of 0 or out of range would read as success or be refused by the kernel.
        let n = if e.0 > 0 && e.0 < 4096 {
            e.0
        } else {
            libc::EIO
        };
        Reply {
            error: -n,
            body: Vec::new(),
        }
    }

    pub fn from(r: crate::error::Result<Vec<u8>>) -> Reply {
        match r {
            Ok(b) => Reply::ok(b),
            Err(e) => Reply::err(e),
        }
    }

    /// The out header for request `unique`, for a reply of this body.
    pub fn header(&self, unique: u64) -> [u8; abi::OUT_HEADER_LEN] {
        out_header(unique, self.error, self.body.len())
    }
}

pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; abi::OUT_HEADER_LEN] {
    let mut h = [0u8; abi::OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&((abi::OUT_HEADER_LEN + body_len) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Appends native-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn with_capacity(n: usize) -> Writer {
        Writer(Vec::with_capacity(n))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

fn type_bits(k: Kind) -> u32 {
    match k {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDev => libc::S_IFCHR,
        Kind::BlockDev => libc::S_IFBLK,
    }
}

/// Seconds and nanoseconds of a time in nanoseconds since the epoch (negative before it).
fn split_ns(ns: i64) -> (u64, u32) {
    (
        ns.div_euclid(1_000_000_000) as u64,
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// struct fuse_attr.
pub fn attr(w: &mut Writer, a: &Attr) {
    let (at, atn) = split_ns(a.atime);
    let (mt, mtn) = split_ns(a.mtime);
    let (ct, ctn) = split_ns(a.ctime);
    w.u64(a.ino).u64(a.size).u64(a.blocks);
    w.u64(at).u64(mt).u64(ct).u32(atn).u32(mtn).u32(ctn);
    w.u32(type_bits(a.kind) | (a.perm & 0o7777));
    w.u32(a.nlink).u32(a.uid).u32(a.gid).u32(a.rdev);
    w.u32(4096).u32(0); // blksize, flags
}

/// struct fuse_entry_out; `None` is a negative entry (inode 0) the kernel caches for `ttl`.
pub fn entry(w: &mut Writer, ttl: Duration, a: Option<&Attr>) {
    let (s, ns) = (ttl.as_secs(), ttl.subsec_nanos());
    match a {
        Some(a) => {
            w.u64(a.ino).u64(0).u64(s).u64(s).u32(ns).u32(ns);
            attr(w, a);
        }
        None => {
            w.u64(0).u64(0).u64(s).u64(0).u32(ns).u32(0);
            w.zeros(abi::ATTR_LEN);
        }
    }
}

pub fn entry_reply(ttl: Duration, a: Option<&Attr>) -> Vec<u8> {
    let mut w = Writer::with_capacity(abi::ENTRY_OUT_LEN);
    entry(&mut w, ttl, a);
    w.0
}

/// struct fuse_attr_out.
pub fn attr_reply(ttl: Duration, a: &Attr) -> Vec<u8> {
    let mut w = Writer::with_capacity(abi::ATTR_OUT_LEN);
    w.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
    attr(&mut w, a);
    w.0
}

/// struct fuse_open_out.
pub fn open_out(w: &mut Writer, fh: u64, flags: u32, backing_id: i32) {
    w.u64(fh).u32(flags).u32(backing_id as u32);
}

/// struct fuse_write_out.
pub fn write_reply(n: u32) -> Vec<u8> {
    let mut w = Writer::with_capacity(8);
    w.u32(n).u32(0);
    w.0
}

/// struct fuse_statfs_out.
pub fn statfs_reply(s: &StatFs) -> Vec<u8> {
    let mut w = Writer::with_capacity(80);
    w.u64(s.blocks)
        .u64(s.bfree)
        .u64(s.bavail)
        .u64(s.files)
        .u64(s.ffree);
    w.u32(s.bsize).u32(s.namelen).u32(s.frsize).u32(0).zeros(24);
    w.0
}

/// struct fuse_getxattr_out (the size a buffer must have).
pub fn xattr_size_reply(n: u32) -> Vec<u8> {
    let mut w = Writer::with_capacity(8);
    w.u32(n).u32(0);
    w.0
}

/// struct fuse_lseek_out.
pub fn lseek_reply(off: i64) -> Vec<u8> {
    (off as u64).to_ne_bytes().to_vec()
}

/// Entries of a READDIR or READDIRPLUS answer, never more than the kernel's buffer holds.
pub struct DirBuf {
    buf: Vec<u8>,
    max: usize,
}

impl DirBuf {
    pub fn new(max: u32) -> DirBuf {
        DirBuf {
            buf: Vec::with_capacity((max as usize).min(64 << 10)),
            max: max as usize,
        }
    }

    /// Adds a plain entry; true when it did not fit (and was not added).
    pub fn add(&mut self, ino: u64, off: u64, kind: Kind, name: &OsStr) -> bool {
        let name = name.as_bytes();
        let len = abi::DIRENT_NAME_OFFSET + name.len();
        let padded = len.next_multiple_of(8);
        if self.buf.len() + padded > self.max {
            return true;
        }
        self.dirent(ino, off, kind, name, padded - len);
        false
    }

    /// Adds an entry with its attributes (`None`: a placeholder the kernel ignores, used
    /// for ".."); true when it did not fit.
    pub fn add_plus(
        &mut self,
        ino: u64,
        off: u64,
        kind: Kind,
        name: &OsStr,
        ttl: Duration,
        a: Option<&Attr>,
    ) -> bool {
        let name = name.as_bytes();
        let len = abi::ENTRY_OUT_LEN + abi::DIRENT_NAME_OFFSET + name.len();
        let padded = len.next_multiple_of(8);
        if self.buf.len() + padded > self.max {
            return true;
        }
        let mut w = Writer(std::mem::take(&mut self.buf));
        match a {
            Some(a) => entry(&mut w, ttl, Some(a)),
            None => {
                // No entry the kernel would keep: nodeid 0 with the inode number in the
                // dirent is what it expects for "..".
                w.zeros(abi::ENTRY_OUT_LEN);
            }
        }
        self.buf = w.0;
        self.dirent(ino, off, kind, name, padded - len);
        false
    }

    fn dirent(&mut self, ino: u64, off: u64, kind: Kind, name: &[u8], pad: usize) {
        let mut w = Writer(std::mem::take(&mut self.buf));
        w.u64(ino)
            .u64(off)
            .u32(name.len() as u32)
            .u32(type_bits(kind) >> 12);
        w.0.extend_from_slice(name);
        w.zeros(pad);
        self.buf = w.0;
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_file() -> Attr {
        Attr {
            ino: 5,
            kind: Kind::File,
            perm: 0o644,
            uid: 1,
            gid: 2,
            size: 4096,
            blocks: 8,
            atime: -1,
            mtime: 1_500_000_000_123_456_789,
            ctime: 0,
            nlink: 1,
            rdev: 0,
        }
    }

    #[test]
    fn entries_and_attrs_have_the_kernel_sizes_and_fields() {
        let e = entry_reply(Duration::from_millis(1500), Some(&a_file()));
        assert_eq!(e.len(), abi::ENTRY_OUT_LEN);
        assert_eq!(u64::from_ne_bytes(e[0..8].try_into().unwrap()), 5);
        assert_eq!(u64::from_ne_bytes(e[16..24].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_ne_bytes(e[32..36].try_into().unwrap()),
            500_000_000
        );
        let attr = &e[40..];
        // mode = S_IFREG | 0644 at offset 60 of fuse_attr
        assert_eq!(
            u32::from_ne_bytes(attr[60..64].try_into().unwrap()),
            0o100644
        );
        // atime -1 ns is one nanosecond before the epoch
        assert_eq!(i64::from_ne_bytes(attr[24..32].try_into().unwrap()), -1);
        assert_eq!(
            u32::from_ne_bytes(attr[48..52].try_into().unwrap()),
            999_999_999
        );
        let a = attr_reply(Duration::from_secs(1), &a_file());
        assert_eq!(a.len(), abi::ATTR_OUT_LEN);
        let n = entry_reply(Duration::from_secs(1), None);
        assert_eq!((n.len(), &n[0..8]), (abi::ENTRY_OUT_LEN, &[0u8; 8][..]));
    }

    #[test]
    fn a_dir_buffer_never_exceeds_the_kernels_size() {
        let mut d = DirBuf::new(64);
        assert!(!d.add(1, 1, Kind::Dir, OsStr::new(".")));
        assert!(!d.add(1, 2, Kind::Dir, OsStr::new("..")));
        assert!(
            d.add(9, 3, Kind::File, OsStr::new("x")),
            "a third does not fit in 64"
        );
        let b = d.into_bytes();
        assert_eq!(b.len(), 64);
        assert_eq!(u32::from_ne_bytes(b[16..20].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_ne_bytes(b[20..24].try_into().unwrap()),
            libc::DT_DIR as u32
        );
        let mut p = DirBuf::new(4096);
        assert!(!p.add_plus(
            5,
            3,
            Kind::File,
            OsStr::new("f"),
            Duration::from_secs(1),
            Some(&a_file())
        ));
        assert_eq!(
            p.into_bytes().len(),
            (128 + 24 + 1usize).next_multiple_of(8)
        );
    }

    #[test]
    fn errors_are_negative_and_never_zero() {
        assert_eq!(Reply::err(Errno::ENOENT).error, -libc::ENOENT);
        assert_eq!(Reply::err(Errno(0)).error, -libc::EIO);
        let h = Reply::ok(vec![1, 2, 3]).header(9);
        assert_eq!(u32::from_ne_bytes(h[0..4].try_into().unwrap()), 19);
    }
}
