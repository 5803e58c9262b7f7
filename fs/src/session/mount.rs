//! Mounting a FUSE connection with mount(2): the options a kcache mount takes and the data
//! string the kernel's fuse filesystem parses.
//!
//! kcache's daemon runs as root (or with CAP_SYS_ADMIN in the user namespace owning the
//! mount namespace), so it mounts directly rather than through the setuid fusermount3.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::dev::Dev;

/// What a mount looks like to the kernel.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Shown as the source in /proc/mounts.
    pub fsname: String,
    /// The part after "fuse." in the filesystem type.
    pub subtype: String,
    pub read_only: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
}

impl MountOptions {
    fn flags(&self) -> libc::c_ulong {
        let mut f = 0;
        for (on, bit) in [
            (self.read_only, libc::MS_RDONLY),
            (self.nosuid, libc::MS_NOSUID),
            (self.nodev, libc::MS_NODEV),
            (self.noexec, libc::MS_NOEXEC),
            (self.noatime, libc::MS_NOATIME),
        ] {
            if on {
                f |= bit;
            }
        }
        f
    }

    /// The fuse filesystem's own options.
    fn data(&self, fd: i32, rootmode: u32, uid: u32, gid: u32) -> String {
        let mut d = format!("fd={fd},rootmode={rootmode:o},user_id={uid},group_id={gid}");
        if self.default_permissions {
            d.push_str(",default_permissions");
        }
        if self.allow_other {
            d.push_str(",allow_other");
        }
        d
    }
}

fn cstring(what: &str, b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Opens a new connection and mounts it at `mountpoint`.
pub fn mount(mountpoint: &Path, o: &MountOptions) -> io::Result<Dev> {
    let dev = Dev::open()?;
    let meta = std::fs::metadata(mountpoint)?;
    let rootmode = meta.mode() & libc::S_IFMT;
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let src = cstring("fsname", o.fsname.as_bytes())?;
    let target = cstring("mountpoint", mountpoint.as_os_str().as_bytes())?;
    let fstype = cstring("subtype", format!("fuse.{}", o.subtype).as_bytes())?;
    let data = cstring("options", o.data(dev.raw(), rootmode, uid, gid).as_bytes())?;
    // SAFETY: all pointers are to NUL-terminated strings that live across the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            o.flags(),
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (mounting needs root, or CAP_SYS_ADMIN over this mount namespace)"
        } else {
            ""
        };
        return Err(io::Error::new(
            e.kind(),
            format!(
                "mount(2) of fuse.{} at {}: {e}{hint}",
                o.subtype,
                mountpoint.display()
            ),
        ));
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_flags_and_fuse_data() {
        let o = MountOptions {
            read_only: true,
            noatime: true,
            allow_other: true,
            default_permissions: true,
            ..Default::default()
        };
        assert_eq!(o.flags(), libc::MS_RDONLY | libc::MS_NOATIME);
        assert_eq!(
            o.data(5, libc::S_IFDIR, 0, 0),
            "fd=5,rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"
        );
    }
}
