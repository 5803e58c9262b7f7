//! The FUSE wire protocol's numbers and sizes (include/uapi/linux/fuse.h), as kcache speaks it.
//!
//! Only what kcache sends or receives is here. Structures are read and written field by field
//! in host byte order (`request.rs`, `reply.rs`), so no `repr(C)` layout is trusted; the sizes
//! below are the kernel's and are checked against the offsets the codecs use.

/// Protocol version kcache implements: 7.42 is FUSE over io_uring.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 42;
/// Oldest minor version kcache accepts: 7.31 is Linux 5.2, the first with every flag and
/// struct size used here (READDIRPLUS, MAX_PAGES, CACHE_SYMLINKS, 40-byte read/write_in).
pub const MIN_MINOR_VERSION: u32 = 31;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const INIT_OUT_LEN: usize = 64;
pub const DIRENT_NAME_OFFSET: usize = 24;

/// Request opcodes (enum fuse_opcode).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
    pub const STATX: u32 = 52;
}

/// FUSE_INIT flags (the 64-bit value: `flags | flags2 << 32`).
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    /// The daemon clears setuid/setgid (and capabilities) on write, truncate and chown, as
    /// the kernel flags them; the kernel then checks `security.capability` only once per
    /// inode instead of before every write(2).
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// fuse_open_out.open_flags.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// fuse_setattr_in.valid.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    /// Clear setuid/setgid as a write by the caller would (HANDLE_KILLPRIV_V2).
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// fuse_write_in.write_flags: clear setuid/setgid before writing (HANDLE_KILLPRIV_V2).
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// fuse_open_in.open_flags / fuse_create_in.open_flags: an O_TRUNC open that clears
/// setuid/setgid (HANDLE_KILLPRIV_V2).
pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// Notification codes, sent in fuse_out_header.error with unique 0.
pub mod notify {
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
}

/// fuse_fsync_in.fsync_flags.
pub const FSYNC_FDATASYNC: u32 = 1;

/// ioctl numbers on /dev/fuse (_IOR/_IOW with type 229).
pub mod ioctl {
    const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
        (dir << 30) | (size << 16) | (229 << 8) | nr
    }
    /// FUSE_DEV_IOC_CLONE: _IOR(229, 0, uint32_t).
    pub const CLONE: u64 = ioc(2, 0, 4);
    /// FUSE_DEV_IOC_BACKING_OPEN: _IOW(229, 1, struct fuse_backing_map).
    pub const BACKING_OPEN: u64 = ioc(1, 1, 16);
    /// FUSE_DEV_IOC_BACKING_CLOSE: _IOW(229, 2, uint32_t).
    pub const BACKING_CLOSE: u64 = ioc(1, 2, 4);
}

/// FUSE over io_uring (fs/fuse/dev_uring.c).
pub mod uring {
    /// io_uring command opcodes (sqe->cmd_op).
    pub const CMD_REGISTER: u32 = 1;
    pub const CMD_COMMIT_AND_FETCH: u32 = 2;
    /// struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out.
    pub const IN_OUT_OFFSET: usize = 0;
    pub const OP_IN_OFFSET: usize = 128;
    pub const OP_IN_LEN: usize = 128;
    pub const ENT_IN_OUT_OFFSET: usize = 256;
    pub const REQ_HEADER_LEN: usize = 256 + 32;
    /// Offsets inside fuse_uring_ent_in_out: flags u64, commit_id u64, payload_sz u32.
    pub const ENT_COMMIT_ID: usize = ENT_IN_OUT_OFFSET + 8;
    pub const ENT_PAYLOAD_SZ: usize = ENT_IN_OUT_OFFSET + 16;
    /// The kernel's smallest request buffer (FUSE_MIN_READ_BUFFER).
    pub const MIN_PAYLOAD: usize = 8192;
}

/// The op-specific header that precedes names and data in a request (in_args[0]), by
/// opcode: the classic transport gets it contiguous with the rest, io_uring in a separate
/// area. Operations whose first argument is a name have none.
pub fn op_in_len(op: u32) -> usize {
    use opcode::*;
    match op {
        FORGET | INTERRUPT | LINK | RENAME | MKDIR | OPEN | OPENDIR | ACCESS | GETXATTR
        | LISTXATTR | SETXATTR | SYNCFS => 8,
        GETATTR | MKNOD | RENAME2 | FSYNC | FSYNCDIR | CREATE | TMPFILE | BMAP => 16,
        RELEASE | RELEASEDIR | FLUSH | LSEEK | POLL => 24,
        SETATTR => 88,
        READ | WRITE | READDIR | READDIRPLUS => 40,
        IOCTL | FALLOCATE => 32,
        GETLK | SETLK | SETLKW => 48,
        COPY_FILE_RANGE => 56,
        BATCH_FORGET => 8,
        STATX => 24,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(ioctl::CLONE, 0x8004_e500);
        assert_eq!(ioctl::BACKING_OPEN, 0x4010_e501);
        assert_eq!(ioctl::BACKING_CLOSE, 0x4004_e502);
    }

    #[test]
    fn op_headers_have_the_kernel_sizes() {
        assert_eq!(op_in_len(opcode::WRITE), 40);
        assert_eq!(op_in_len(opcode::FALLOCATE), 32);
        assert_eq!(op_in_len(opcode::CREATE), 16);
        assert_eq!(op_in_len(opcode::LOOKUP), 0);
        assert_eq!(op_in_len(opcode::SYMLINK), 0);
        assert_eq!(op_in_len(opcode::SETATTR), 88);
        assert!(op_in_len(opcode::SETATTR) <= uring::OP_IN_LEN);
        assert_eq!(ENTRY_OUT_LEN, 128);
        assert_eq!(ATTR_OUT_LEN, 104);
    }
}
