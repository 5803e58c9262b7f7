//! The private staging file of an inode open for writing: how it is made from the committed
//! content (copy-on-write that keeps holes), what it knows about its content so far, and
//! the raw file helpers (copying, SEEK_DATA/SEEK_HOLE, setting the mtime) it needs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use kcache_store::{Blobs, Hash, Ino, StreamHasher};

use crate::error::Result;
use crate::types::ts;

pub(crate) struct Staging {
    pub(crate) file: Arc<File>,
    pub(crate) path: PathBuf,
    /// Changed since it was made from the committed content (or created empty).
    pub(crate) dirty: bool,
    /// Hash of the content so far while it has only been written front to back (the common
    /// case: a new file written in order); `None` once anything else happened.
    pub(crate) stream: Option<StreamHasher>,
}

impl Staging {
    /// A new staging file for inode `ino` holding `from`'s content (or nothing), with the
    /// file's mtime. Armed once complete: from then on a daemon crash does not lose what is
    /// written to it (the next open of the store commits it).
    pub(crate) fn new(
        blobs: &Blobs<'_>,
        ino: Ino,
        from: Option<Hash>,
        mtime: i64,
    ) -> Result<Staging> {
        // An empty start is complete at once: made armed, without the rename a copy needs.
        let (file, path) = match from {
            None => blobs.new_armed_staging(ino)?,
            Some(_) => blobs.new_staging()?,
        };
        let prepared = (|| -> Result<PathBuf> {
            let Some(h) = from else {
                set_file_mtime(&file, mtime)?;
                return Ok(path.clone());
            };
            let blob = blobs.open_blob(&h)?;
            copy_content(&blob, &file)?;
            set_file_mtime(&file, mtime)?;
            Ok(blobs.arm_staging(&path, ino)?)
        })();
        let path = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(Staging {
            file: Arc::new(file),
            path,
            dirty: false,
            stream: from.is_none().then(StreamHasher::default),
        })
    }

    /// Empties the staged content for O_TRUNC, with mtime `now`; an empty file is written
    /// front to back again from here, so the streamed hash starts over.
    pub(crate) fn reset(&mut self, now: i64) -> std::io::Result<()> {
        self.file.set_len(0)?;
        set_file_mtime(&self.file, now)?;
        self.stream = Some(StreamHasher::default());
        Ok(())
    }

    /// Notes that `data` was written at `offset`: the streamed hash goes on only while
    /// writes arrive in order.
    pub(crate) fn note_write(&mut self, offset: u64, data: &[u8]) {
        match &mut self.stream {
            Some(h) if h.len() == offset => h.update(data),
            _ => self.stream = None,
        }
    }

    /// The staged content's current length.
    pub(crate) fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

pub(crate) fn set_file_mtime(file: &File, mtime: i64) -> std::io::Result<()> {
    let (s, ns) = ts(mtime);
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    ];
    // SAFETY: valid fd and a two-element timespec array.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// lseek(2) on a descriptor, for SEEK_DATA and SEEK_HOLE (only the answer is used: every
/// read and write here is positional, so moving the shared file offset does no harm).
pub(crate) fn seek_raw(file: &File, offset: i64, whence: i32) -> std::io::Result<i64> {
    // SAFETY: lseek on a valid descriptor; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Copies `src` into `dst` (an empty file): a reflink where the filesystem has them, else
/// the data extents only, found with SEEK_DATA/SEEK_HOLE, so holes stay holes (a byte-wise
/// copy would allocate every zero of a sparse file). The length is set at the end, which
/// keeps a trailing hole.
pub(crate) fn copy_content(src: &File, dst: &File) -> std::io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its argument.
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = src.metadata()?.len();
    let end = i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    let mut pos = 0i64;
    while pos < end {
        let data = match seek_raw(src, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // Only a hole up to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        let hole = seek_raw(src, data, libc::SEEK_HOLE)?.min(end);
        copy_range(src, dst, data as u64, (hole - data) as u64)?;
        pos = hole;
    }
    dst.set_len(len)
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst`: in the kernel
/// (copy_file_range) where it can, else through a buffer.
pub(crate) fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (offset + done) as libc::loff_t;
        let mut off_out = off_in;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: valid descriptors and offsets that live across the call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n > 0 {
            done += n as u64;
            continue;
        }
        if n == 0 {
            // The source ended early (it is never written, so this is damage).
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                return copy_buffered(src, dst, offset + done, len - done);
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// `copy_range` through a buffer in user space, for files copy_file_range cannot copy.
pub(crate) fn copy_buffered(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        src.read_exact_at(&mut buf[..want], offset + done)?;
        dst.write_all_at(&buf[..want], offset + done)?;
        done += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::mtime_of;

    fn file_in(dir: &tempfile::TempDir, name: &str) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join(name))
            .unwrap()
    }

    fn contents(f: &File) -> Vec<u8> {
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    /// A sparse file: a hole, data at 1 MiB, a hole again, a trailing hole to 4 MiB.
    fn sparse(dir: &tempfile::TempDir) -> File {
        let f = file_in(dir, "src");
        f.write_all_at(b"hello", 1 << 20).unwrap();
        f.write_all_at(b"world", 3 << 20).unwrap();
        f.set_len(4 << 20).unwrap();
        f
    }

    #[test]
    fn copy_content_keeps_bytes_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse(&dir);
        let dst = file_in(&dir, "dst");
        copy_content(&src, &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 4 << 20);
        assert_eq!(contents(&dst), contents(&src));
    }

    #[test]
    fn copy_content_keeps_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src = sparse(&dir);
        let dst = file_in(&dir, "dst");
        copy_content(&src, &dst).unwrap();
        let (s, d) = (src.metadata().unwrap(), dst.metadata().unwrap());
        if s.blocks() * 512 >= 4 << 20 {
            // The temporary directory's filesystem keeps no holes: nothing to check.
            return;
        }
        // Whether by reflink or by extents, the copy is sparse too (a byte-wise copy would
        // take all 4 MiB).
        assert!(d.blocks() * 512 < 4 << 20, "{} blocks", d.blocks());
    }

    #[test]
    fn copy_content_of_an_empty_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_in(&dir, "src");
        let dst = file_in(&dir, "dst");
        copy_content(&src, &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 0);
    }

    #[test]
    fn copy_range_and_copy_buffered_copy_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_in(&dir, "src");
        src.write_all_at(b"0123456789", 0).unwrap();
        let dst = file_in(&dir, "dst");
        copy_range(&src, &dst, 2, 3).unwrap();
        assert_eq!(contents(&dst), b"\x00\x00234");
        copy_buffered(&src, &dst, 7, 3).unwrap();
        assert_eq!(contents(&dst), b"\x00\x00234\x00\x00789");
        // Past the end of the source: damage, not a short copy.
        assert!(copy_range(&src, &dst, 8, 5).is_err());
    }

    #[test]
    fn seek_raw_finds_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse(&dir);
        let data = seek_raw(&src, 0, libc::SEEK_DATA).unwrap();
        assert!(data <= 1 << 20);
        let hole = seek_raw(&src, 1 << 20, libc::SEEK_HOLE).unwrap();
        assert!(hole > 1 << 20 && hole <= 4 << 20);
        let e = seek_raw(&src, 4 << 20, libc::SEEK_DATA).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO));
    }

    #[test]
    fn set_file_mtime_sets_nanoseconds() {
        let f = tempfile::tempfile().unwrap();
        let t = 1_234_567_890_123_456_789;
        set_file_mtime(&f, t).unwrap();
        assert_eq!(mtime_of(&f.metadata().unwrap()), t);
    }

    fn store() -> (tempfile::TempDir, kcache_store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = kcache_store::Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn new_empty_staging_streams_in_order_writes_only() {
        let (_dir, store) = store();
        let mut st = Staging::new(&store.blobs(), 5, None, 77).unwrap();
        assert!(!st.dirty);
        assert!(st.path.exists());
        assert_eq!(st.len().unwrap(), 0);
        assert_eq!(mtime_of(&st.file.metadata().unwrap()), 77);
        st.file.write_all_at(b"abc", 0).unwrap();
        st.note_write(0, b"abc");
        st.file.write_all_at(b"def", 3).unwrap();
        st.note_write(3, b"def");
        assert_eq!(st.stream.as_ref().map(StreamHasher::len), Some(6));
        assert_eq!(st.len().unwrap(), 6);
        // Out of order: the streamed hash no longer describes the content.
        st.note_write(1, b"x");
        assert!(st.stream.is_none());
        // O_TRUNC starts the stream over.
        st.reset(99).unwrap();
        assert_eq!(st.len().unwrap(), 0);
        assert_eq!(st.stream.as_ref().map(StreamHasher::len), Some(0));
        assert_eq!(mtime_of(&st.file.metadata().unwrap()), 99);
        // No group is open: retiring the file deletes it at once.
        let path = st.path.clone();
        store.blobs().retire_staging(st.path);
        assert!(!path.exists());
    }
}
