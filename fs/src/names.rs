//! Names and inode numbers as the kernel sees them: the checks a new name must pass, the
//! translation between kernel and store inode numbers (the volume root is inode 1 to the
//! kernel), and the count of lookups the kernel holds on each inode.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use kcache_store::Ino;

use crate::core::lock;
use crate::error::{Errno, Result};

/// The inode number the kernel uses for the root.
pub const ROOT_INO: u64 = 1;
pub(crate) const NAME_MAX: usize = 255;
pub(crate) const PATH_MAX: usize = 4096;

/// A name for a new or removed entry: one path component of at most NAME_MAX bytes.
pub(crate) fn check_name(name: &OsStr) -> Result<&[u8]> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(b)
}

/// A symlink's target: shorter than PATH_MAX and not empty.
pub(crate) fn check_target(target: &OsStr) -> Result<&[u8]> {
    let t = target.as_bytes();
    if t.len() >= PATH_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if t.is_empty() {
        return Err(Errno(libc::ENOENT));
    }
    Ok(t)
}

/// An extended attribute to set: a name of 1 to 255 bytes, a value of at most 64 KiB (the
/// limits of Linux's xattr calls).
pub(crate) fn check_xattr<'n>(name: &'n OsStr, value: &[u8]) -> Result<&'n [u8]> {
    let name = name.as_bytes();
    if name.is_empty() || name.len() > 255 {
        return Err(Errno::ERANGE);
    }
    if value.len() > 65536 {
        return Err(Errno(libc::E2BIG));
    }
    Ok(name)
}

/// Kernel inode number -> store inode number, for a volume whose root is `root`.
pub(crate) fn store_ino(ino: u64, root: Ino) -> Ino {
    if ino == ROOT_INO {
        root
    } else {
        ino
    }
}

/// Store inode number -> kernel inode number, for a volume whose root is `root`.
pub(crate) fn kernel_ino(ino: Ino, root: Ino) -> u64 {
    if ino == root {
        ROOT_INO
    } else {
        ino
    }
}

/// How many lookups the kernel holds on each inode (by store number): every entry it was
/// given counts one, and FORGET gives them back. An inode without any is one the kernel no
/// longer knows, so nothing but open handles can still reach it.
#[derive(Default)]
pub(crate) struct Lookups(Mutex<HashMap<Ino, u64>>);

impl Lookups {
    /// The kernel learnt of `ino` once more.
    pub(crate) fn remember(&self, ino: Ino) {
        *lock(&self.0).entry(ino).or_insert(0) += 1;
    }

    /// The kernel gave back `nlookup` of its lookups on `ino`. True when that was the last
    /// of them: the kernel dropped the inode.
    pub(crate) fn forget(&self, ino: Ino, nlookup: u64) -> bool {
        let mut l = lock(&self.0);
        match l.get_mut(&ino) {
            Some(n) if *n > nlookup => {
                *n -= nlookup;
                false
            }
            Some(_) => {
                l.remove(&ino);
                true
            }
            None => false,
        }
    }

    /// True while the kernel holds a lookup on `ino`.
    pub(crate) fn contains(&self, ino: Ino) -> bool {
        lock(&self.0).contains_key(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_component_of_at_most_name_max_bytes() {
        assert_eq!(check_name(OsStr::new("a")).unwrap(), b"a");
        assert_eq!(check_name(OsStr::new("...")).unwrap(), b"...");
        let longest = "x".repeat(NAME_MAX);
        assert!(check_name(OsStr::new(&longest)).is_ok());
        let long = "x".repeat(NAME_MAX + 1);
        assert_eq!(check_name(OsStr::new(&long)), Err(Errno::ENAMETOOLONG));
        for bad in ["", ".", "..", "a/b", "/"] {
            assert_eq!(check_name(OsStr::new(bad)), Err(Errno::EINVAL), "{bad:?}");
        }
        // Too long is reported before the other faults.
        let slashes = "/".repeat(NAME_MAX + 1);
        assert_eq!(check_name(OsStr::new(&slashes)), Err(Errno::ENAMETOOLONG));
    }

    #[test]
    fn symlink_targets_are_shorter_than_path_max_and_not_empty() {
        assert_eq!(check_target(OsStr::new("../a/b")).unwrap(), b"../a/b");
        assert!(check_target(OsStr::new(&"x".repeat(PATH_MAX - 1))).is_ok());
        assert_eq!(
            check_target(OsStr::new(&"x".repeat(PATH_MAX))),
            Err(Errno::ENAMETOOLONG)
        );
        assert_eq!(check_target(OsStr::new("")), Err(Errno(libc::ENOENT)));
    }

    #[test]
    fn xattr_names_and_values_keep_to_linuxs_limits() {
        assert_eq!(check_xattr(OsStr::new("user.a"), b"v").unwrap(), b"user.a");
        assert_eq!(check_xattr(OsStr::new(""), b"v"), Err(Errno::ERANGE));
        let long = format!("user.{}", "x".repeat(251));
        assert_eq!(check_xattr(OsStr::new(&long), b""), Err(Errno::ERANGE));
        assert!(check_xattr(OsStr::new(&long[1..]), &[0; 65536]).is_ok());
        assert_eq!(
            check_xattr(OsStr::new("user.a"), &[0; 65537]),
            Err(Errno(libc::E2BIG))
        );
        // A bad name is reported before a bad value.
        assert_eq!(check_xattr(OsStr::new(""), &[0; 65537]), Err(Errno::ERANGE));
    }

    #[test]
    fn the_volume_root_is_inode_one_to_the_kernel() {
        let root = 17;
        assert_eq!(store_ino(ROOT_INO, root), root);
        assert_eq!(store_ino(5, root), 5);
        assert_eq!(kernel_ino(root, root), ROOT_INO);
        assert_eq!(kernel_ino(5, root), 5);
        for ino in [root, 2, 5, 99] {
            assert_eq!(store_ino(kernel_ino(ino, root), root), ino);
        }
        // A volume whose root is store inode 1 translates nothing.
        assert_eq!(store_ino(ROOT_INO, 1), 1);
        assert_eq!(kernel_ino(1, 1), ROOT_INO);
    }

    #[test]
    fn lookups_add_up_and_the_last_forget_reports_the_inode_gone() {
        let l = Lookups::default();
        assert!(!l.contains(3));
        l.remember(3);
        l.remember(3);
        l.remember(3);
        l.remember(4);
        assert!(l.contains(3));
        assert!(!l.forget(3, 2));
        assert!(l.contains(3));
        assert!(l.forget(3, 1));
        assert!(!l.contains(3));
        assert!(l.contains(4));
    }

    #[test]
    fn forgetting_more_than_was_looked_up_drops_the_inode_and_unknown_ones_are_ignored() {
        let l = Lookups::default();
        l.remember(8);
        assert!(l.forget(8, 5));
        assert!(!l.contains(8));
        // Already gone, or never known: nothing to report.
        assert!(!l.forget(8, 1));
        assert!(!l.forget(9, 1));
    }
}
