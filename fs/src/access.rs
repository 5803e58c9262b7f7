//! What an open asks for, read once from its flags: whether it writes, whether it can read
//! through its handle at all, and whether it truncates.

/// The access an open(2) or create asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    /// O_WRONLY or O_RDWR.
    pub(crate) writable: bool,
    /// O_WRONLY: nothing is ever read through this handle (and it cannot be mapped), so it
    /// has no use for the inode's page cache (see `OpenInode::open_handle`).
    pub(crate) write_only: bool,
    /// O_TRUNC on a writable open (the kernel ignores it on a read-only one).
    pub(crate) trunc: bool,
}

impl Access {
    /// A read-only open.
    #[cfg(test)]
    pub(crate) const READ: Access = Access {
        writable: false,
        write_only: false,
        trunc: false,
    };

    pub(crate) fn from_flags(flags: i32) -> Access {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc != libc::O_RDONLY;
        Access {
            writable,
            write_only: acc == libc::O_WRONLY,
            trunc: writable && flags & libc::O_TRUNC != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_access() {
        assert_eq!(Access::from_flags(libc::O_RDONLY), Access::READ);
        // O_TRUNC means nothing without write access.
        assert_eq!(
            Access::from_flags(libc::O_RDONLY | libc::O_TRUNC),
            Access::READ
        );
        let wo = Access::from_flags(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC);
        assert_eq!(
            wo,
            Access {
                writable: true,
                write_only: true,
                trunc: true
            }
        );
        let rw = Access::from_flags(libc::O_RDWR | libc::O_APPEND);
        assert_eq!(
            rw,
            Access {
                writable: true,
                write_only: false,
                trunc: false
            }
        );
    }
}
