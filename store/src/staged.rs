//! Staged content that outlives its daemon: a staging file armed for an inode (its name says
//! which inode, and which boot) is committed as that inode's content by the next open of the
//! store, so a daemon that dies keeps what processes wrote, as a filesystem keeps a dead
//! writer's data. Unarmed staging files, and armed ones from an earlier boot (whose bytes may
//! not have reached the disk whole), are deleted as before, unless a leaving daemon made them
//! durable (`keep_staging_across_reboot`: content it could not commit).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::blobs::{boot_id, Staged};
use crate::error::{IoContext, Result};
use crate::{Ino, Kind, Store};

/// `name` armed for inode `ino` in boot `boot`.
pub(crate) fn armed_name(name: &str, ino: Ino, boot: &str) -> String {
    format!("{name}.i{ino}.b{boot}")
}

/// The sequence number of a staging file's name (`<pid>-<seq>...`, see
/// `Blobs::create_staging`): later files of a store have higher ones.
fn staging_seq(name: &str) -> Option<u64> {
    let (_, rest) = name.split_once('-')?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// The boot part of an armed staging file made durable (`keep_staging_across_reboot`): a
/// real boot id is 32 hex digits, never this.
pub(crate) const DURABLE_BOOT: &str = "0";

/// (inode, boot) of an armed staging file's name; None for any other name.
fn parse_armed(name: &str) -> Option<(Ino, &str)> {
    let (rest, boot) = name.rsplit_once(".b")?;
    let (_, ino) = rest.rsplit_once(".i")?;
    if boot.is_empty() || !boot.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((ino.parse().ok()?, boot))
}

/// What recovery did with the staging directory.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Files whose staged content became their content.
    pub kept: u64,
    /// Staging files deleted (unarmed, from another boot, or for an inode that is gone).
    pub removed: u64,
}

impl Store {
    /// Commits every armed staging file of this boot whose inode is still a linked regular
    /// file, and deletes the rest. Runs at open, before unlinked inodes are purged.
    pub(crate) fn recover_staging(&self) -> Result<Recovered> {
        let dir = self.root.join("staging");
        let mut out = Recovered::default();
        let boot = boot_id();
        // An inode can have several armed files: content committed in a group the crash
        // lost (its file is deleted only once the group commits) and newer content staged
        // after it. The newest (highest sequence number) is the inode's content.
        let mut newest: HashMap<Ino, (u64, PathBuf)> = HashMap::new();
        let mut unwanted: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))? {
            let entry = entry.ctx(|| format!("reading {}", dir.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let armed = name
                .to_str()
                .and_then(|n| Some((parse_armed(n)?, staging_seq(n)?)))
                .filter(|((_, b), _)| (!boot.is_empty() && *b == boot) || *b == DURABLE_BOOT);
            match armed {
                Some(((ino, _), seq)) => match newest.get(&ino) {
                    Some((s, _)) if *s > seq => unwanted.push(path),
                    _ => {
                        if let Some((_, older)) = newest.insert(ino, (seq, path)) {
                            unwanted.push(older);
                        }
                    }
                },
                None => unwanted.push(path),
            }
        }
        for (ino, (_, path)) in newest {
            if self.keep_staged(ino, &path)? {
                out.kept += 1;
            } else {
                unwanted.push(path);
            }
        }
        for path in unwanted {
            let _ = fs::remove_file(&path);
            out.removed += 1;
        }
        Ok(out)
    }

    /// Makes every armed staging file of this boot durable (its data, then its new name
    /// saying so, then the directory), so that the next open commits it even after a reboot:
    /// content the daemon could not commit as it leaves (its store halted, a commit failing
    /// at the unmount) would otherwise be dropped by a reboot, as unsynced staged bytes are.
    /// Only for a store nobody writes any more. Returns how many files it kept.
    pub fn keep_staging_across_reboot(&self) -> Result<u64> {
        let dir = self.root.join("staging");
        let boot = boot_id();
        let mut kept = 0;
        for entry in fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))? {
            let entry = entry.ctx(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((ino, b)) = parse_armed(name) else {
                continue;
            };
            if boot.is_empty() || b != boot {
                continue;
            }
            let Some((base, _)) = name.split_once(".i") else {
                continue;
            };
            let path = entry.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .ctx(|| format!("syncing {}", path.display()))?;
            let to = dir.join(armed_name(base, ino, DURABLE_BOOT));
            fs::rename(&path, &to).ctx(|| format!("renaming {}", path.display()))?;
            kept += 1;
        }
        if kept > 0 {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .ctx(|| format!("syncing {}", dir.display()))?;
        }
        Ok(kept)
    }

    /// Commits staging file `path` as inode `ino`'s content if that inode is still a linked
    /// regular file. False when it is not (the caller deletes the file).
    fn keep_staged(&self, ino: Ino, path: &Path) -> Result<bool> {
        let inode = match self.ns().get(ino) {
            Ok(i) => i,
            Err(crate::Error::NotFound) => return Ok(false),
            Err(e) => return Err(e),
        };
        if inode.kind != Kind::File || inode.nlink == 0 {
            return Ok(false);
        }
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let md = file
            .metadata()
            .ctx(|| format!("reading {}", path.display()))?;
        // The staging file's mtime is the file's: writes keep it current.
        let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        let st = Staged {
            ino,
            path,
            file: &file,
            known: None,
            // Durable: the database will say this content is the file's, so its bytes must
            // be on disk first.
            durable: true,
            mtime,
        };
        // Durable: committed on its own, so the file went with it.
        let (hash, size) = self.blobs().commit_staged(&st)?;
        tracing::info!(ino, %hash, size, "kept content written before the daemon stopped");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_names_say_their_inode_and_boot_and_nothing_else_parses() {
        let n = armed_name("123-4", 99, "abc123");
        assert_eq!(n, "123-4.i99.babc123");
        assert_eq!(parse_armed(&n), Some((99, "abc123")));
        for other in [
            "123-4",
            "123-4.i99",
            "123-4.bff",
            "x.ifoo.bff",
            "x.i1.b",
            "x.i1.bzz",
        ] {
            assert_eq!(parse_armed(other), None, "{other}");
        }
    }

    #[test]
    fn staging_names_carry_a_sequence_number() {
        assert_eq!(staging_seq(&armed_name("123-45", 99, "abc")), Some(45));
        assert_eq!(
            staging_seq("123-1765000000000000000"),
            Some(1765000000000000000)
        );
        assert_eq!(staging_seq("123"), None);
        assert_eq!(staging_seq("123-x"), None);
    }
}
