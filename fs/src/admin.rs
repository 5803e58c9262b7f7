//! Maintenance on a live mount: pins, clearing trees, garbage collection and usage per
//! directory, addressed by paths relative to the volume root. Whatever removes names here
//! also tells the kernel, so a cleared file does not linger in its caches.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use kcache_store::{DuEntry, GcReport, Ino, Kind, NameChange, PullReport, Remote};

use crate::core::{lock, KcacheFs};
use crate::error::{Errno, Result};

impl KcacheFs {
    /// The inode at `path` (relative to the volume root; symlinks are not followed).
    pub fn resolve(&self, path: &str) -> Result<Ino> {
        Ok(self.store.resolve(self.volume.root, path)?)
    }

    /// Pins a file or tree; returns the bytes pinned in total.
    pub fn pin(&self, path: &str) -> Result<u64> {
        let ino = self.resolve(path)?;
        Ok(self.store.pin(ino)?)
    }

    /// Unpins; ENOENT when `path` was not pinned.
    pub fn unpin(&self, path: &str) -> Result<()> {
        let ino = self.resolve(path)?;
        if !self.store.unpin(ino)? {
            return Err(Errno::ENOENT);
        }
        Ok(())
    }

    /// Pinned paths of this volume.
    pub fn pins(&self) -> Result<Vec<String>> {
        Ok(self
            .store
            .pins(self.volume.id)?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// Removes a file, or everything inside a directory (the directory itself stays).
    /// Files still open keep their content until closed, as with unlink. Returns the number
    /// of names removed.
    pub fn clear(&self, path: &str) -> Result<u64> {
        self.writable()?;
        let ino = self.resolve(path)?;
        let removed = if self.store.ns().get(ino)?.kind == Kind::Dir {
            self.store.clear_dir(ino)?
        } else {
            let (dir, name) = path
                .trim_end_matches('/')
                .rsplit_once('/')
                .unwrap_or(("", path));
            let parent = self.resolve(dir)?;
            let (ino, nlink) = self.store.ns().unlink(parent, name.as_bytes())?;
            vec![(parent, name.as_bytes().to_vec(), ino, nlink)]
        };
        let kc = lock(&self.kernel_cache).clone();
        for (parent, name, ino, nlink) in &removed {
            if let Some(kc) = &kc {
                kc.name_gone(self.kino(*parent), OsStr::from_bytes(name), self.kino(*ino));
            }
            if *nlink == 0 {
                self.maybe_purge(*ino);
            }
        }
        tracing::info!(path, names = removed.len(), "cleared");
        Ok(removed.len() as u64)
    }

    /// Merges the snapshot tagged `tag` into this filesystem's volume while it is in use
    /// (`Store::pull_with`, `PullMode::Merge`): one transaction, then the kernel is told
    /// about every name that changed, so readers see the new names at once. A replaced file
    /// is unlinked as by a rename over it: open handles keep reading what they opened, and
    /// its inode goes once the last one is closed and the kernel has forgotten it.
    pub fn pull_merge(
        &self,
        remote: &Remote,
        tag: &str,
        trusted: &[String],
        theirs: bool,
    ) -> kcache_store::Result<PullReport> {
        if self.writable().is_err() {
            return Err(kcache_store::Error::Invalid(
                "the volume is mounted read-only",
            ));
        }
        // Unlike an unlink the kernel made itself, the kernel may still reach a replaced
        // inode through what it cached before it is told, even between two handles: such an
        // inode goes when the kernel forgets it, not when its last handle closes. Marked
        // before the transaction commits, so no release purges it in between.
        let mut marked = Vec::new();
        let pulled = self.store.pull_with_hook(
            remote,
            tag,
            &self.volume.name,
            trusted,
            kcache_store::PullMode::Merge { theirs },
            &mut |changed| {
                let mut keep = lock(&self.kept_until_forgotten);
                for c in changed {
                    if let Some((ino, 0)) = c.replaced {
                        keep.insert(ino);
                        marked.push(ino);
                    }
                }
            },
        );
        let pulled = match pulled {
            Ok(p) => p,
            Err(e) => {
                let mut keep = lock(&self.kept_until_forgotten);
                for ino in &marked {
                    keep.remove(ino);
                }
                return Err(e);
            }
        };
        self.names_changed(&pulled.changed);
        for ino in marked {
            self.maybe_purge(ino);
        }
        tracing::info!(tag, report = ?pulled.report, "merged a snapshot");
        Ok(pulled.report)
    }

    /// Tells the kernel that names were added or now name another inode: their cached
    /// entries, the replaced inodes' attributes, and each directory's attributes go.
    fn names_changed(&self, changed: &[NameChange]) {
        let Some(kc) = lock(&self.kernel_cache).clone() else {
            return;
        };
        let mut dirs = std::collections::HashSet::new();
        for c in changed {
            let parent = self.kino(c.parent);
            let ino = c.replaced.map_or(parent, |(ino, _)| self.kino(ino));
            let name = OsStr::from_bytes(&c.name);
            // Naming the directory as the inode drops its attributes too (once is enough).
            kc.name_gone(parent, name, ino);
            if dirs.insert(parent) && ino != parent {
                kc.name_gone(parent, name, parent);
            }
        }
    }

    /// Garbage collection; inodes the kernel or a handle still holds are left alone.
    pub fn gc(&self) -> Result<GcReport> {
        // Held by any mount of the store, not only this one.
        let peers = self.peers();
        let report = self
            .store
            .gc(|ino| self.is_held(ino) || peers.iter().any(|p| p.is_held(ino)))?;
        tracing::info!(?report, "garbage collected");
        Ok(report)
    }

    /// Usage per directory below `path`.
    pub fn du(&self, path: &str, depth: u32) -> Result<Vec<DuEntry>> {
        let ino = self.resolve(path)?;
        Ok(self.store.du(ino, depth)?)
    }
}
