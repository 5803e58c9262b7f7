//! Counts of the FUSE requests the kernel sent, by kind: what `kcache-bench` divides by the
//! files of a phase to show the round trips each file costs, and what `/metrics` exports.
//!
//! The adapter counts every request it is handed, including the ones it answers with ENOSYS
//! so that the kernel stops sending them: those count until the kernel has learnt.

use std::sync::atomic::{AtomicU64, Ordering};

/// A kind of FUSE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Forget,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Readdirplus,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Access,
    Create,
    Ioctl,
    Fallocate,
    Lseek,
    CopyFileRange,
    Bmap,
    Poll,
}

impl Op {
    pub const ALL: [Op; 36] = [
        Op::Lookup,
        Op::Forget,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Release,
        Op::Fsync,
        Op::Opendir,
        Op::Readdir,
        Op::Readdirplus,
        Op::Releasedir,
        Op::Fsyncdir,
        Op::Statfs,
        Op::Setxattr,
        Op::Getxattr,
        Op::Listxattr,
        Op::Removexattr,
        Op::Access,
        Op::Create,
        Op::Ioctl,
        Op::Fallocate,
        Op::Lseek,
        Op::CopyFileRange,
        Op::Bmap,
        Op::Poll,
    ];

    /// The name used in metrics labels and the bench: the FUSE opcode, lower case.
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Forget => "forget",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Readdirplus => "readdirplus",
            Op::Releasedir => "releasedir",
            Op::Fsyncdir => "fsyncdir",
            Op::Statfs => "statfs",
            Op::Setxattr => "setxattr",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Removexattr => "removexattr",
            Op::Access => "access",
            Op::Create => "create",
            Op::Ioctl => "ioctl",
            Op::Fallocate => "fallocate",
            Op::Lseek => "lseek",
            Op::CopyFileRange => "copy_file_range",
            Op::Bmap => "bmap",
            Op::Poll => "poll",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Requests counted so far, one counter per kind; shared by every mount of a daemon.
pub struct RequestCounts {
    counts: [AtomicU64; Op::ALL.len()],
}

impl Default for RequestCounts {
    fn default() -> RequestCounts {
        RequestCounts {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RequestCounts {
    /// Counts one request of kind `op`. Relaxed: these are statistics, read as a whole only
    /// between workload phases.
    pub fn count(&self, op: Op) {
        self.counts[op.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Every kind with its count so far.
    pub fn snapshot(&self) -> Vec<(Op, u64)> {
        Op::ALL
            .iter()
            .map(|&op| (op, self.counts[op.index()].load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_counter_and_a_unique_name() {
        let c = RequestCounts::default();
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "{op:?} out of order in ALL");
            for _ in 0..=i {
                c.count(*op);
            }
        }
        for (i, (op, n)) in c.snapshot().into_iter().enumerate() {
            assert_eq!(n, i as u64 + 1, "{op:?}");
        }
        let mut names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
    }
}
