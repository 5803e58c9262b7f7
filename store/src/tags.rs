//! Moving a tag without losing another pusher's update: read the tag, compute the new
//! pointer from it, and write it only if the tag is still what was read, else start again
//! from the newer one. A `file://` upstream does the three steps under an exclusive lock on a
//! file beside the tag; an object store checks the version itself (a conditional PUT on the
//! ETag, or on GCS the generation).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::remote::{rand_u64, Upstream};

/// Attempts before a push gives up on a tag that keeps changing under it.
const ATTEMPTS: u32 = 50;

/// What a tag update makes of the tag's current pointer (None: no tag yet).
pub(crate) type NextPointer<'a> = dyn FnMut(Option<&[u8]>) -> Result<Vec<u8>> + 'a;

impl Upstream {
    /// Replaces tag `tag` by what `next` makes of its current pointer (None: no such tag
    /// yet), atomically with respect to every other `update_tag` on the tag: when another
    /// writer changed the tag in between, `next` runs again on the newer pointer.
    pub(crate) fn update_tag(&self, tag: &str, next: &mut NextPointer<'_>) -> Result<()> {
        let key = format!("tags/{tag}");
        match self {
            Upstream::File(root) => {
                let path = root.join(&key);
                let dir = path.parent().expect("tags live in a directory");
                let io = |what: &str, e: std::io::Error| Error::Remote(format!("{what}: {e}"));
                fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
                // The lock is a file of its own, so the tag itself is always replaced by a
                // rename (readers see the old pointer or the new one) and the lock outlives
                // each version.
                let lock_path = dir.join(format!(".{tag}.lock"));
                let lock = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(|e| io(&lock_path.display().to_string(), e))?;
                // SAFETY: flock on a descriptor we own; closing it releases the lock (also
                // when this process dies, so a crashed pusher never blocks the next).
                if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(io(&format!("locking {}", lock_path.display()), e));
                }
                let current = match fs::read(&path) {
                    Ok(b) => Some(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io(&path.display().to_string(), e)),
                };
                let new = next(current.as_deref())?;
                let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), rand_u64()));
                let res = (|| -> std::io::Result<()> {
                    let mut f = File::create(&tmp)?;
                    f.write_all(&new)?;
                    f.sync_all()?;
                    fs::rename(&tmp, &path)?;
                    File::open(dir)?.sync_all()
                })();
                if let Err(e) = res {
                    let _ = fs::remove_file(&tmp);
                    return Err(io(&path.display().to_string(), e));
                }
                drop(lock);
                Ok(())
            }
            Upstream::Object(s) => {
                for attempt in 0..ATTEMPTS {
                    let current = s
                        .get_versioned(&key)
                        .map_err(|e| Error::Remote(e.to_string()))?;
                    let (bytes, version) = match &current {
                        Some((b, v)) => (Some(&b[..]), Some(v)),
                        None => (None, None),
                    };
                    if version.is_some_and(|v| v.e_tag.is_none() && v.version.is_none()) {
                        return Err(Error::Remote(format!(
                            "{}: the store gave no ETag or generation, so the tag cannot be updated safely",
                            s.url_of(&key)
                        )));
                    }
                    let new = next(bytes)?;
                    if s.put_if(&key, &new, version)
                        .map_err(|e| Error::Remote(e.to_string()))?
                    {
                        return Ok(());
                    }
                    // Another pusher moved the tag: back off a little (more each time, with
                    // jitter so that racing pushers spread out) and merge again.
                    let ms = 20 * u64::from(attempt + 1) + rand_u64() % 50;
                    std::thread::sleep(Duration::from_millis(ms));
                }
                Err(Error::Remote(format!(
                    "{}: the tag changed under this push {ATTEMPTS} times in a row; try again",
                    s.url_of(&key)
                )))
            }
            Upstream::Http(base) => Err(Error::Remote(format!(
                "{base} is read-only (http upstreams cannot be pushed to)"
            ))),
        }
    }
}
