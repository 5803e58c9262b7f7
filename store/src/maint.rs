//! Cache administration over the namespace: limits and settings, pins, statistics counters,
//! per-directory usage (`du`), clearing trees and garbage collection.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::atomic::Ordering;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, IoContext, Result};
use crate::{now_ns, DiskSpace, Hash, Ino, Kind, Store};

/// Counters the daemon bumps on hot paths; kept in memory and added to the database with the
/// access batches (see `flush_accesses`), so they survive restarts without a write per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Opens = 0,
    BytesRead = 1,
    BytesWritten = 2,
}

pub(crate) const COUNTERS: [Counter; 3] =
    [Counter::Opens, Counter::BytesRead, Counter::BytesWritten];

impl Counter {
    pub fn name(self) -> &'static str {
        match self {
            Counter::Opens => "opens",
            Counter::BytesRead => "bytes_read",
            Counter::BytesWritten => "bytes_written",
        }
    }
}

/// Adds `n` to a persistent counter inside a transaction.
pub(crate) fn add_counter(tx: &Connection, name: &str, n: u64) -> rusqlite::Result<()> {
    if n == 0 {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT INTO counters (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + ?2",
    )?
    .execute(params![name, n as i64])?;
    Ok(())
}

/// Free space to keep on the store's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinFree {
    Bytes(u64),
    /// Percent of the disk's size.
    Percent(u8),
}

impl MinFree {
    pub fn bytes(self, disk: &DiskSpace) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => {
                let total = disk.blocks.saturating_mul(disk.frsize as u64);
                (total as u128 * p as u128 / 100) as u64
            }
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{b}"),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for MinFree {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<MinFree, String> {
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(MinFree::Percent(p)),
                _ => Err(format!("invalid percentage '{s}' (0-100%)")),
            };
        }
        s.trim()
            .parse::<u64>()
            .map(MinFree::Bytes)
            .map_err(|_| format!("invalid size '{s}'"))
    }
}

/// How full the store may get. Persisted in the store, so a restart keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of local blobs; `None` means no quota.
    pub quota: Option<u64>,
    /// Eviction brings usage down to this percentage of the quota.
    pub low_watermark_pct: u8,
    /// Free space kept on the store's disk: below it, eviction starts.
    pub min_free: MinFree,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            quota: None,
            low_watermark_pct: 90,
            min_free: MinFree::Percent(10),
        }
    }
}

impl Limits {
    /// Usage eviction aims for once the quota is exceeded.
    pub fn low_watermark(&self) -> Option<u64> {
        self.quota
            .map(|q| (q as u128 * self.low_watermark_pct as u128 / 100) as u64)
    }
}

/// One line of `kcache du`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DuEntry {
    /// Path relative to the directory asked about ("" for itself).
    pub path: String,
    pub depth: u32,
    pub files: u64,
    /// Sum of file sizes (each hard-linked file once).
    pub logical_bytes: u64,
    /// This tree's share of the store: each blob's size divided among the files that hold it,
    /// so the shares of all trees add up to the store's usage.
    pub stored_bytes: u64,
    /// The same share of what the blob files take on disk (their allocation, smaller than
    /// their size when sparse; the size where it was never measured, see migration 5).
    pub disk_bytes: u64,
}

/// What `gc` cleaned up.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub purged_inodes: u64,
    pub dead_blobs_removed: u64,
    pub stray_files_removed: u64,
    pub stray_bytes: u64,
    pub wal_bytes_before: u64,
    pub wal_bytes_after: u64,
}

/// One name removed by `clear`: (parent, name, inode, link count left).
pub type Removed = (Ino, Vec<u8>, Ino, u32);

impl Store {
    pub(crate) fn take_pending_counters(&self) -> Vec<(&'static str, u64)> {
        COUNTERS
            .iter()
            .map(|c| {
                (
                    c.name(),
                    self.pending_counters[*c as usize].swap(0, Ordering::Relaxed),
                )
            })
            .collect()
    }

    pub(crate) fn restore_pending_counter(&self, name: &str, n: u64) {
        if let Some(c) = COUNTERS.iter().find(|c| c.name() == name) {
            self.pending_counters[*c as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds to a statistics counter (memory only until the next flush).
    pub fn count(&self, c: Counter, n: u64) {
        self.pending_counters[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter: persisted value plus what is still pending in memory.
    pub fn counters(&self) -> Result<HashMap<String, u64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT name, value FROM counters")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out: HashMap<String, u64> = HashMap::new();
        for r in rows {
            let (k, v) = r?;
            out.insert(k, v.max(0) as u64);
        }
        for c in COUNTERS {
            *out.entry(c.name().to_owned()).or_default() +=
                self.pending_counters[c as usize].load(Ordering::Relaxed);
        }
        Ok(out)
    }

    fn setting(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The store's limits; defaults where none were set.
    pub fn limits(&self) -> Result<Limits> {
        let mut l = Limits::default();
        if let Some(q) = self.setting("quota")? {
            l.quota = q.parse::<u64>().ok().filter(|q| *q > 0);
        }
        if let Some(p) = self.setting("low_watermark_pct")? {
            if let Ok(p) = p.parse::<u8>() {
                l.low_watermark_pct = p.clamp(1, 100);
            }
        }
        if let Some(m) = self.setting("min_free")? {
            if let Ok(m) = m.parse() {
                l.min_free = m;
            }
        }
        Ok(l)
    }

    /// Records new limits. The caller (the daemon) applies them.
    pub fn set_limits(&self, l: &Limits) -> Result<()> {
        if !(1..=100).contains(&l.low_watermark_pct) {
            return Err(Error::Invalid("low watermark must be 1-100% of the quota"));
        }
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        for (k, v) in [
            ("quota", l.quota.unwrap_or(0).to_string()),
            ("low_watermark_pct", l.low_watermark_pct.to_string()),
            ("min_free", l.min_free.to_string()),
        ] {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = ?2",
                params![k, v],
            )?;
        }
        self.commit_tx(tx)?;
        Ok(())
    }

    /// Upstreams remembered from pulls, used by mounts that name none.
    pub fn upstream_settings(&self) -> Result<Vec<String>> {
        Ok(self
            .setting("upstreams")?
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default())
    }

    pub fn add_upstream_setting(&self, url: &str) -> Result<()> {
        let mut list = self.upstream_settings()?;
        if !list.iter().any(|u| u == url) {
            list.push(url.to_owned());
        }
        self.conn().execute(
            "INSERT INTO settings (name, value) VALUES ('upstreams', ?1)
             ON CONFLICT (name) DO UPDATE SET value = ?1",
            [list.join("\n")],
        )?;
        Ok(())
    }

    /// Public keys (hex) whose signatures `pull` requires.
    pub fn trusted_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .setting("trusted_keys")?
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default())
    }

    pub fn add_trusted_key(&self, key: &str) -> Result<()> {
        let key = key.trim().to_ascii_lowercase();
        if key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Invalid("a public key is 64 hex digits"));
        }
        let mut list = self.trusted_keys()?;
        if !list.contains(&key) {
            list.push(key);
        }
        self.conn().execute(
            "INSERT INTO settings (name, value) VALUES ('trusted_keys', ?1)
             ON CONFLICT (name) DO UPDATE SET value = ?1",
            [list.join("\n")],
        )?;
        Ok(())
    }

    /// Resolves a path inside a volume (components separated by '/', no symlinks followed)
    /// to an inode.
    pub fn resolve(&self, root: Ino, path: &str) -> Result<Ino> {
        let mut cur = root;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                return Err(Error::Invalid("'..' in a store path"));
            }
            cur = self.ns().lookup(cur, comp.as_bytes())?.ino;
        }
        Ok(cur)
    }

    /// A path of `ino` relative to the root of its volume (one of its names, for hard links).
    pub fn path_of(&self, ino: Ino) -> Result<String> {
        let conn = self.conn();
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut cur = ino;
        for _ in 0..100_000 {
            let up: Option<(i64, Vec<u8>)> = conn
                .prepare_cached("SELECT parent, name FROM dirents WHERE ino = ?1 LIMIT 1")?
                .query_row([cur as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match up {
                Some((p, name)) => {
                    parts.push(name);
                    cur = p as Ino;
                }
                None => break,
            }
        }
        parts.reverse();
        let mut s = String::new();
        for p in parts {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(&p));
        }
        if s.is_empty() {
            s.push('/');
        }
        Ok(s)
    }

    /// Distinct blobs of every pinned tree, and their total size.
    pub fn pinned_blobs(&self) -> Result<(HashSet<Hash>, u64)> {
        pinned_blobs_in(&self.conn())
    }

    /// Pins a file or a whole tree: eviction leaves it alone, including files added to the
    /// tree later. Refused when the pinned total would exceed half the quota.
    pub fn pin(&self, ino: Ino) -> Result<u64> {
        let limits = self.limits()?;
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        let n = crate::ns::must_inode(&tx, ino)?;
        if n.nlink == 0 {
            return Err(Error::NotFound);
        }
        tx.execute(
            "INSERT OR IGNORE INTO pins (ino, created) VALUES (?1, ?2)",
            params![ino as i64, now_ns()],
        )?;
        let (_, bytes) = pinned_blobs_in(&tx)?;
        if let Some(q) = limits.quota {
            if bytes > q / 2 {
                return Err(Error::PinLimit {
                    pinned: bytes,
                    limit: q / 2,
                });
            }
        }
        self.commit_tx(tx)?;
        Ok(bytes)
    }

    /// Removes a pin; false if there was none on `ino`.
    pub fn unpin(&self, ino: Ino) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM pins WHERE ino = ?1", [ino as i64])?
            > 0)
    }

    /// Pinned inodes of volume `volume` with a path each.
    pub fn pins(&self, volume: i64) -> Result<Vec<(Ino, String)>> {
        let inos: Vec<i64> = {
            let conn = self.conn();
            let mut stmt = conn.prepare(
                "SELECT p.ino FROM pins p JOIN inodes i ON i.ino = p.ino
                 WHERE i.volume = ?1 ORDER BY p.ino",
            )?;
            let rows = stmt.query_map([volume], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        inos.into_iter()
            .map(|i| Ok((i as Ino, self.path_of(i as Ino)?)))
            .collect()
    }

    /// Logical and stored bytes per directory under `dir`, down to `depth` levels below it.
    pub fn du(&self, dir: Ino, depth: u32) -> Result<Vec<DuEntry>> {
        struct Node {
            parent: Option<usize>,
            path: String,
            depth: u32,
            files: u64,
            logical: u64,
            stored: f64,
            disk: f64,
        }
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "WITH RECURSIVE t(ino, parent, name, depth) AS (
                 SELECT ?1, NULL, x'', 0
                 UNION ALL
                 SELECT d.ino, d.parent, d.name, t.depth + 1 FROM dirents d JOIN t ON d.parent = t.ino
             )
             SELECT t.ino, t.parent, t.name, t.depth, i.kind, i.size, b.size, b.refs,
                    coalesce(b.blocks * 512, b.size)
             FROM t JOIN inodes i ON i.ino = t.ino LEFT JOIN blobs b ON b.hash = i.blob",
        )?;
        let mut nodes: Vec<Node> = Vec::new();
        let mut dir_index: HashMap<i64, usize> = HashMap::new();
        let mut seen_files: HashSet<i64> = HashSet::new();
        let mut rows = stmt.query([dir as i64])?;
        // Rows come parents first (breadth-first by the recursion), so a directory is indexed
        // before its children.
        while let Some(r) = rows.next()? {
            let ino: i64 = r.get(0)?;
            let parent: Option<i64> = r.get(1)?;
            let name: Vec<u8> = r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default();
            let d: u32 = r.get(3)?;
            let kind: Kind = r.get(4)?;
            let size: i64 = r.get(5)?;
            let blob_size: Option<i64> = r.get(6)?;
            let refs: Option<i64> = r.get(7)?;
            let blob_disk: Option<i64> = r.get(8)?;
            let pidx = parent.and_then(|p| dir_index.get(&p).copied());
            if kind == Kind::Dir {
                let path = match pidx {
                    Some(p) if !nodes[p].path.is_empty() => {
                        format!("{}/{}", nodes[p].path, String::from_utf8_lossy(&name))
                    }
                    Some(_) => String::from_utf8_lossy(&name).into_owned(),
                    None => String::new(),
                };
                nodes.push(Node {
                    parent: pidx,
                    path,
                    depth: d,
                    files: 0,
                    logical: 0,
                    stored: 0.0,
                    disk: 0.0,
                });
                dir_index.insert(ino, nodes.len() - 1);
                continue;
            }
            if kind != Kind::File || !seen_files.insert(ino) {
                continue;
            }
            let share = |bytes: Option<i64>| match (bytes, refs) {
                (Some(s), Some(r)) if r > 0 => s as f64 / r as f64,
                _ => 0.0,
            };
            let (share, disk_share) = (share(blob_size), share(blob_disk));
            let mut cur = pidx;
            if pidx.is_none() {
                // `dir` is itself a file.
                nodes.push(Node {
                    parent: None,
                    path: String::new(),
                    depth: 0,
                    files: 0,
                    logical: 0,
                    stored: 0.0,
                    disk: 0.0,
                });
                cur = Some(nodes.len() - 1);
            }
            while let Some(i) = cur {
                nodes[i].files += 1;
                nodes[i].logical += size.max(0) as u64;
                nodes[i].stored += share;
                nodes[i].disk += disk_share;
                cur = nodes[i].parent;
            }
        }
        Ok(nodes
            .into_iter()
            .filter(|n| n.depth <= depth)
            .map(|n| DuEntry {
                path: n.path,
                depth: n.depth,
                files: n.files,
                logical_bytes: n.logical,
                stored_bytes: n.stored.round() as u64,
                disk_bytes: n.disk.round() as u64,
            })
            .collect())
    }

    /// Removes everything below directory `dir` (or the file `dir` itself is not: use
    /// `unlink` for files). One transaction per directory emptied. Removed files whose link
    /// count drops to 0 are left for the caller to purge once nothing holds them open.
    pub fn clear_dir(&self, dir: Ino) -> Result<Vec<Removed>> {
        let mut removed = Vec::new();
        self.clear_dir_into(dir, &mut removed, 0)?;
        Ok(removed)
    }

    fn clear_dir_into(&self, dir: Ino, removed: &mut Vec<Removed>, depth: u32) -> Result<()> {
        if depth > 4096 {
            return Err(Error::Invalid("directory tree too deep"));
        }
        let entries: Vec<(Vec<u8>, Ino, Kind)> = {
            let conn = self.conn();
            let mut stmt = conn.prepare(
                "SELECT d.name, d.ino, i.kind FROM dirents d JOIN inodes i ON i.ino = d.ino
                 WHERE d.parent = ?1",
            )?;
            let rows = stmt.query_map([dir as i64], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as Ino, r.get::<_, Kind>(2)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (_, ino, kind) in &entries {
            if *kind == Kind::Dir {
                self.clear_dir_into(*ino, removed, depth + 1)?;
            }
        }
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        let now = now_ns();
        for (name, ino, _) in entries {
            // Renamed or replaced since it was listed: leave it alone.
            let still: Option<i64> = tx
                .query_row(
                    "SELECT ino FROM dirents WHERE parent = ?1 AND name = ?2",
                    params![dir as i64, &name],
                    |r| r.get(0),
                )
                .optional()?;
            if still != Some(ino as i64) {
                continue;
            }
            let nlink = crate::ns::drop_link(&tx, dir, &name, ino, now)?;
            removed.push((dir, name, ino, nlink));
        }
        crate::ns::touch_dir(&tx, dir, now)?;
        self.commit_tx(tx)?;
        Ok(())
    }

    /// Cleans up what normal operation leaves for later: unlinked inodes nobody holds
    /// (`is_open` says which are still held), blob files whose rows are gone, stray files in
    /// `blobs/`, and the write-ahead log.
    pub fn gc(&self, is_open: impl Fn(Ino) -> bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let wal = self.db_path.with_extension("db-wal");
        report.wal_bytes_before = fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        self.lru().flush_accesses()?;
        let unlinked: Vec<Ino> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT ino FROM inodes WHERE nlink = 0")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|i| i as Ino))
                .collect::<rusqlite::Result<_>>()?
        };
        for ino in unlinked.into_iter().filter(|i| !is_open(*i)) {
            self.ns().purge(ino)?;
            report.purged_inodes += 1;
        }
        report.dead_blobs_removed = self.blobs().sweep_dead_blobs()?;
        let blobs = self.root.join("blobs");
        for sub in fs::read_dir(&blobs).ctx(|| format!("reading {}", blobs.display()))? {
            let sub = sub.ctx(|| format!("reading {}", blobs.display()))?.path();
            let Ok(files) = fs::read_dir(&sub) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let name = f.file_name();
                let hash = name.to_str().and_then(Hash::from_hex);
                // Checked and removed under the database lock: a commit renames its blob
                // file into place and records it while holding the same lock.
                // Out of any group: a row deleted only in an uncommitted group would come
                // back after a crash, without the file removed here.
                let conn = self.conn_direct()?;
                // A remote-only row has no file: one there is left by an eviction whose
                // unlink failed (an install renames and records under this same lock).
                let known = match hash {
                    Some(h) => crate::lifecycle::row(&conn, &h)?
                        .is_some_and(|r| r.state != crate::BlobState::RemoteOnly),
                    None => false,
                };
                if !known {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if fs::remove_file(&path).is_ok() {
                        report.stray_files_removed += 1;
                        report.stray_bytes += len;
                    }
                }
            }
            let _ = fs::remove_dir(&sub); // only succeeds when empty
        }
        {
            let conn = self.conn_direct()?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            conn.execute_batch("PRAGMA optimize")?;
        }
        report.wal_bytes_after = fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        Ok(report)
    }
}

fn pinned_blobs_in(conn: &Connection) -> Result<(HashSet<Hash>, u64)> {
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE t(ino) AS (
             SELECT ino FROM pins
             UNION
             SELECT d.ino FROM dirents d JOIN t ON d.parent = t.ino
         )
         SELECT DISTINCT b.hash, b.size FROM t JOIN inodes i ON i.ino = t.ino
         JOIN blobs b ON b.hash = i.blob",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Hash>(0)?,
            crate::codec::unsigned(r.get(1)?, "blobs.size")?,
        ))
    })?;
    let mut set = HashSet::new();
    let mut bytes = 0u64;
    for r in rows {
        let (h, s) = r?;
        set.insert(h);
        bytes += s;
    }
    Ok((set, bytes))
}
