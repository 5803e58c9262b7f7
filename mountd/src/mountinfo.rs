//! Reads /proc/self/mountinfo to find what is mounted where.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    /// The directory of the filesystem mounted here ("/" unless a bind mount of a subtree).
    pub root: String,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes (\040 etc.) mountinfo uses for spaces and friends.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mounts() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let root = l.nth(3)?;
            let mp = l.next()?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mp)),
                root: unescape(root),
                fstype: fstype.to_owned(),
                source: unescape(source),
            })
        })
        .collect()
}

/// The last (topmost) mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// The kcache mount that `path` (canonical) is in: the deepest mountpoint above it.
pub fn kcache_mount_of(path: &Path) -> Option<MountEntry> {
    mounts()
        .into_iter()
        .rev()
        .filter(|m| path.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.components().count())
        .filter(|m| m.fstype == "fuse.kcache")
}

/// True when a mount with device number `dev` (st_dev) is in this namespace's mount table. A
/// FUSE mount that `umount` (or a lazy detach) took away is not, even while its daemon still
/// serves it.
pub fn is_attached(dev: u64) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        // Cannot tell: count it as attached, which refuses a second mount of its volume.
        return true;
    };
    let want = (libc::major(dev), libc::minor(dev));
    text.lines().any(|line| {
        line.split(' ')
            .nth(2)
            .and_then(|mm| mm.split_once(':'))
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            == Some(want)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_root_filesystem_is_attached_and_a_made_up_device_is_not() {
        let dev = std::fs::metadata("/").unwrap().dev();
        assert!(is_attached(dev));
        assert!(!is_attached(libc::makedev(4095, 1_000_000)));
    }
}
