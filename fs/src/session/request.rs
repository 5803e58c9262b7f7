//! Decodes one FUSE request, from whichever transport brought it, into an `Operation`.
//!
//! A request is three parts: the fixed header, the op-specific header (`op_in`) and the rest
//! (names, written data: `payload`). /dev/fuse delivers them in one buffer, which
//! `split_classic` cuts; io_uring delivers them in separate areas. Both then go through
//! `decode`, so there is one decoder. Anything short or malformed is `EINVAL`, never a panic.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::abi::{self, opcode};
use crate::error::Errno;

/// struct fuse_in_header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Result<InHeader, Errno> {
        let mut r = Reader::new(b);
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
        };
        Ok(h)
    }
}

/// A FUSE_SETATTR's requested changes, as the kernel sent them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub size: u64,
    pub atime: (u64, u32),
    pub mtime: (u64, u32),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One decoded request.
#[derive(Debug, PartialEq, Eq)]
pub enum Operation<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Interrupt,
    Lookup(&'a OsStr),
    Forget(u64),
    BatchForget(Vec<(u64, u64)>),
    Getattr,
    Setattr(SetattrIn),
    Readlink,
    Symlink(&'a OsStr, &'a OsStr),
    Mknod(&'a OsStr, u32, u32),
    Mkdir(&'a OsStr, u32),
    Unlink(&'a OsStr),
    Rmdir(&'a OsStr),
    Rename {
        name: &'a OsStr,
        newdir: u64,
        newname: &'a OsStr,
        flags: u32,
    },
    Link(u64, &'a OsStr),
    /// Open flags, and whether the open clears setuid/setgid (`OPEN_KILL_SUIDGID`).
    Open(i32, bool),
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
        /// Clear setuid/setgid first (`WRITE_KILL_SUIDGID`).
        kill_suidgid: bool,
    },
    Statfs,
    Release(u64),
    Fsync(u64),
    Setxattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
    },
    Getxattr(&'a OsStr, u32),
    Listxattr(u32),
    Removexattr(&'a OsStr),
    Flush,
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir,
    Fsyncdir,
    Access(i32),
    Create {
        name: &'a OsStr,
        mode: u32,
        flags: i32,
        /// An existing file opened with O_TRUNC clears setuid/setgid (`OPEN_KILL_SUIDGID`).
        kill_suidgid: bool,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        fh: u64,
        offset: i64,
        whence: i32,
    },
    /// Everything kcache answers with a fixed errno (ioctl, poll, bmap, copy_file_range,
    /// locks it did not ask for, ...).
    Other(u32),
}

/// Cuts a /dev/fuse buffer into header, op header and payload.
pub fn split_classic(buf: &[u8]) -> Result<(InHeader, &[u8], &[u8]), Errno> {
    let h = InHeader::parse(buf)?;
    let len = h.len as usize;
    if len < abi::IN_HEADER_LEN || len > buf.len() {
        return Err(Errno::EINVAL);
    }
    let rest = &buf[abi::IN_HEADER_LEN..len];
    // INIT's header grew over the versions: take all of it.
    let n = if h.opcode == opcode::INIT {
        rest.len()
    } else {
        abi::op_in_len(h.opcode).min(rest.len())
    };
    Ok((h, &rest[..n], &rest[n..]))
}

/// Decodes the op header and payload of a request with header `h`.
pub fn decode<'a>(
    h: &InHeader,
    op_in: &'a [u8],
    payload: &'a [u8],
) -> Result<Operation<'a>, Errno> {
    use opcode::*;
    let mut r = Reader::new(op_in);
    let mut p = Reader::new(payload);
    Ok(match h.opcode {
        INIT => {
            let major = r.u32()?;
            let minor = r.u32()?;
            let max_readahead = r.u32()?;
            let flags = r.u32()? as u64;
            // flags2 exists from 7.36 on, and only means something with INIT_EXT.
            let flags2 = if flags & abi::init::INIT_EXT != 0 {
                r.u32().unwrap_or(0) as u64
            } else {
                0
            };
            Operation::Init {
                major,
                minor,
                max_readahead,
                flags: flags | (flags2 << 32),
            }
        }
        DESTROY => Operation::Destroy,
        INTERRUPT => Operation::Interrupt,
        LOOKUP => Operation::Lookup(p.name()?),
        FORGET => Operation::Forget(r.u64()?),
        BATCH_FORGET => {
            let count = r.u32()? as usize;
            let mut v = Vec::with_capacity(count.min(payload.len() / 16));
            for _ in 0..count {
                v.push((p.u64()?, p.u64()?));
            }
            Operation::BatchForget(v)
        }
        GETATTR => Operation::Getattr,
        SETATTR => {
            let valid = r.u32()?;
            r.skip(4 + 8)?; // padding, fh
            let size = r.u64()?;
            r.skip(8)?; // lock_owner
            let atime = r.u64()?;
            let mtime = r.u64()?;
            r.skip(8)?; // ctime
            let atimensec = r.u32()?;
            let mtimensec = r.u32()?;
            r.skip(4)?; // ctimensec
            let mode = r.u32()?;
            r.skip(4)?;
            let uid = r.u32()?;
            let gid = r.u32()?;
            Operation::Setattr(SetattrIn {
                valid,
                size,
                atime: (atime, atimensec),
                mtime: (mtime, mtimensec),
                mode,
                uid,
                gid,
            })
        }
        READLINK => Operation::Readlink,
        SYMLINK => {
            let name = p.name()?;
            Operation::Symlink(name, p.name()?)
        }
        MKNOD => {
            let mode = r.u32()?;
            let rdev = r.u32()?;
            Operation::Mknod(p.name()?, mode, rdev)
        }
        MKDIR => {
            let mode = r.u32()?;
            Operation::Mkdir(p.name()?, mode)
        }
        UNLINK => Operation::Unlink(p.name()?),
        RMDIR => Operation::Rmdir(p.name()?),
        RENAME | RENAME2 => {
            let newdir = r.u64()?;
            let flags = if h.opcode == RENAME2 { r.u32()? } else { 0 };
            let name = p.name()?;
            Operation::Rename {
                name,
                newdir,
                newname: p.name()?,
                flags,
            }
        }
        LINK => {
            let old = r.u64()?;
            Operation::Link(old, p.name()?)
        }
        OPEN => {
            let flags = r.u32()? as i32;
            Operation::Open(flags, r.u32()? & abi::OPEN_KILL_SUIDGID != 0)
        }
        READ => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            Operation::Read {
                fh,
                offset,
                size: r.u32()?,
            }
        }
        WRITE => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            let size = r.u32()? as usize;
            let write_flags = r.u32()?;
            Operation::Write {
                fh,
                offset,
                data: p.bytes(size)?,
                kill_suidgid: write_flags & abi::WRITE_KILL_SUIDGID != 0,
            }
        }
        STATFS => Operation::Statfs,
        RELEASE => Operation::Release(r.u64()?),
        FSYNC => Operation::Fsync(r.u64()?),
        SETXATTR => {
            let size = r.u32()? as usize;
            let flags = r.u32()? as i32;
            let name = p.name()?;
            Operation::Setxattr {
                name,
                value: p.bytes(size)?,
                flags,
            }
        }
        GETXATTR => {
            let size = r.u32()?;
            Operation::Getxattr(p.name()?, size)
        }
        LISTXATTR => Operation::Listxattr(r.u32()?),
        REMOVEXATTR => Operation::Removexattr(p.name()?),
        FLUSH => Operation::Flush,
        OPENDIR => Operation::Opendir,
        READDIR | READDIRPLUS => {
            r.skip(8)?; // fh
            let offset = r.u64()?;
            Operation::Readdir {
                offset,
                size: r.u32()?,
                plus: h.opcode == READDIRPLUS,
            }
        }
        RELEASEDIR => Operation::Releasedir,
        FSYNCDIR => Operation::Fsyncdir,
        ACCESS => Operation::Access(r.u32()? as i32),
        CREATE => {
            let flags = r.u32()? as i32;
            let mode = r.u32()?;
            r.skip(4)?; // umask
            let open_flags = r.u32()?;
            Operation::Create {
                name: p.name()?,
                mode,
                flags,
                kill_suidgid: open_flags & abi::OPEN_KILL_SUIDGID != 0,
            }
        }
        FALLOCATE => {
            let fh = r.u64()?;
            let offset = r.u64()?;
            let length = r.u64()?;
            Operation::Fallocate {
                fh,
                offset,
                length,
                mode: r.u32()? as i32,
            }
        }
        LSEEK => {
            let fh = r.u64()?;
            let offset = r.u64()? as i64;
            Operation::Lseek {
                fh,
                offset,
                whence: r.u32()? as i32,
            }
        }
        other => Operation::Other(other),
    })
}

/// Reads native-endian fields and NUL-terminated names from a byte slice, failing with
/// EINVAL where the slice ends early.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        if self.b.len() < n {
            return Err(Errno::EINVAL);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> Result<(), Errno> {
        self.bytes(n).map(|_| ())
    }

    fn u32(&mut self) -> Result<u32, Errno> {
        let b = self.bytes(4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, Errno> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    }

    fn name(&mut self) -> Result<&'a OsStr, Errno> {
        let end = self.b.iter().position(|&c| c == 0).ok_or(Errno::EINVAL)?;
        let name = &self.b[..end];
        self.b = &self.b[end + 1..];
        Ok(OsStr::from_bytes(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: u32, body_len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((abi::IN_HEADER_LEN + body_len) as u32).to_ne_bytes());
        v.extend_from_slice(&op.to_ne_bytes());
        v.extend_from_slice(&7u64.to_ne_bytes()); // unique
        v.extend_from_slice(&42u64.to_ne_bytes()); // nodeid
        v.extend_from_slice(&1000u32.to_ne_bytes());
        v.extend_from_slice(&100u32.to_ne_bytes());
        v.extend_from_slice(&55u32.to_ne_bytes());
        v.extend_from_slice(&[0u8; 4]);
        v
    }

    #[test]
    fn a_classic_create_splits_and_decodes() {
        let mut body = Vec::new();
        body.extend_from_slice(&(libc::O_WRONLY as u32).to_ne_bytes());
        body.extend_from_slice(&0o100644u32.to_ne_bytes());
        body.extend_from_slice(&0o022u32.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend_from_slice(b"file.tmp\0");
        let mut buf = header(opcode::CREATE, body.len());
        buf.extend_from_slice(&body);
        let (h, op_in, payload) = split_classic(&buf).unwrap();
        assert_eq!(
            (h.unique, h.nodeid, h.uid, h.gid, h.pid),
            (7, 42, 1000, 100, 55)
        );
        assert_eq!(
            decode(&h, op_in, payload).unwrap(),
            Operation::Create {
                name: OsStr::new("file.tmp"),
                mode: 0o100644,
                flags: libc::O_WRONLY,
                kill_suidgid: false,
            }
        );
    }

    #[test]
    fn a_rename2_carries_both_names_and_flags() {
        let mut op_in = Vec::new();
        op_in.extend_from_slice(&9u64.to_ne_bytes());
        op_in.extend_from_slice(&1u32.to_ne_bytes());
        op_in.extend_from_slice(&0u32.to_ne_bytes());
        let h = InHeader {
            opcode: opcode::RENAME2,
            ..Default::default()
        };
        let op = decode(&h, &op_in, b"a\0b\0").unwrap();
        assert_eq!(
            op,
            Operation::Rename {
                name: OsStr::new("a"),
                newdir: 9,
                newname: OsStr::new("b"),
                flags: 1
            }
        );
    }

    #[test]
    fn writes_take_exactly_their_size_of_payload() {
        let mut op_in = vec![0u8; 40];
        op_in[8..16].copy_from_slice(&4096u64.to_ne_bytes());
        op_in[16..20].copy_from_slice(&3u32.to_ne_bytes());
        let h = InHeader {
            opcode: opcode::WRITE,
            ..Default::default()
        };
        match decode(&h, &op_in, b"abcdef").unwrap() {
            Operation::Write { offset, data, .. } => {
                assert_eq!((offset, data), (4096, &b"abc"[..]))
            }
            other => panic!("{other:?}"),
        }
        op_in[16..20].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(decode(&h, &op_in, b"abcdef"), Err(Errno::EINVAL));
    }

    #[test]
    fn truncated_or_unterminated_requests_are_einval() {
        let h = InHeader {
            opcode: opcode::LOOKUP,
            ..Default::default()
        };
        assert_eq!(decode(&h, &[], b"no-nul"), Err(Errno::EINVAL));
        let h = InHeader {
            opcode: opcode::READ,
            ..Default::default()
        };
        assert_eq!(decode(&h, &[0u8; 12], &[]), Err(Errno::EINVAL));
        assert_eq!(split_classic(&[0u8; 10]), Err(Errno::EINVAL));
        let mut buf = header(opcode::GETATTR, 16);
        buf.truncate(abi::IN_HEADER_LEN + 4); // len says more than arrived
        assert_eq!(split_classic(&buf), Err(Errno::EINVAL));
    }

    #[test]
    fn init_reads_flags2_only_with_init_ext() {
        let mut op_in = Vec::new();
        for v in [7u32, 45, 1 << 20, (abi::init::INIT_EXT as u32) | 1, 1 << 9] {
            op_in.extend_from_slice(&v.to_ne_bytes());
        }
        op_in.resize(64, 0);
        let h = InHeader {
            opcode: opcode::INIT,
            ..Default::default()
        };
        match decode(&h, &op_in, &[]).unwrap() {
            Operation::Init { minor, flags, .. } => {
                assert_eq!(minor, 45);
                assert!(flags & abi::init::OVER_IO_URING != 0);
                assert!(flags & abi::init::ASYNC_READ != 0);
            }
            other => panic!("{other:?}"),
        }
    }
}
