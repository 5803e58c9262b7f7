//! The remote tier: upstreams that hold blobs and volume snapshots, and fetching a blob that
//! is only there (state `remote`) into the local store on first use.
//!
//! Remote layout (the same on every kind of upstream):
//! - `blobs/<2 hex>/<64 hex>`: a blob's bytes, named by their BLAKE3 hash (uncompressed, so a
//!   ranged read works);
//! - `manifests/<64 hex>`: a gzip-compressed JSON snapshot of a volume's namespace, named by the
//!   BLAKE3 hash of the compressed bytes;
//! - `tags/<name>`: the hash of a manifest (text), the mutable pointer that `pull` follows.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, OptionalExtension};

use crate::error::{Error, IoContext, Result};
use crate::{Hash, Store};

/// One place blobs and manifests can come from (and, for `file://`, go to).
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A directory, e.g. on NFS: read and write.
    File(PathBuf),
    /// Any static HTTP server (or `kcache serve`): read-only.
    Http(String),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::File(p) => write!(f, "file://{}", p.display()),
            Upstream::Http(u) => f.write_str(u),
        }
    }
}

/// Why a read from an upstream did not produce the object.
enum GetError {
    /// The upstream answered that it does not have it.
    Missing,
    /// Worth another try (network, 5xx, timeout).
    Transient(String),
    /// Not worth retrying here (4xx other than 404, local I/O).
    Fatal(String),
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        if let Some(p) = url.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(format!("upstream '{url}': file:// needs an absolute path"));
            }
            return Ok(Upstream::File(PathBuf::from(p)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Ok(Upstream::Http(url.trim_end_matches('/').to_owned()));
        }
        if url.starts_with("s3://") {
            return Err(format!(
                "upstream '{url}': s3:// upstreams are not supported by this build yet"
            ));
        }
        Err(format!(
            "upstream '{url}': expected file:///path, http://host/prefix or https://host/prefix"
        ))
    }

    fn url_of(&self, key: &str) -> String {
        match self {
            Upstream::File(p) => p.join(key).display().to_string(),
            Upstream::Http(base) => format!("{base}/{key}"),
        }
    }

    /// Streams object `key` into `out`; returns the bytes written.
    fn get_to(
        &self,
        client: &reqwest::blocking::Client,
        key: &str,
        out: &mut dyn Write,
    ) -> Result<u64, GetError> {
        match self {
            Upstream::File(root) => {
                let path = root.join(key);
                let mut f = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(GetError::Missing)
                    }
                    Err(e) => return Err(GetError::Transient(format!("{}: {e}", path.display()))),
                };
                std::io::copy(&mut f, out)
                    .map_err(|e| GetError::Transient(format!("{}: {e}", path.display())))
            }
            Upstream::Http(_) => {
                let url = self.url_of(key);
                let mut resp = client
                    .get(&url)
                    .send()
                    .map_err(|e| GetError::Transient(format!("{url}: {e}")))?;
                let status = resp.status();
                if status == reqwest::StatusCode::NOT_FOUND {
                    return Err(GetError::Missing);
                }
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    return Err(GetError::Transient(format!("{url}: HTTP {status}")));
                }
                if !status.is_success() {
                    return Err(GetError::Fatal(format!("{url}: HTTP {status}")));
                }
                resp.copy_to(out)
                    .map_err(|e| GetError::Transient(format!("{url}: {e}")))
            }
        }
    }

    fn get_bytes(
        &self,
        client: &reqwest::blocking::Client,
        key: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut buf = Vec::new();
        match self.get_to(client, key, &mut buf) {
            Ok(_) => Ok(Some(buf)),
            Err(GetError::Missing) => Ok(None),
            Err(GetError::Transient(e) | GetError::Fatal(e)) => Err(e),
        }
    }

    fn has(&self, client: &reqwest::blocking::Client, key: &str) -> Result<bool, String> {
        match self {
            Upstream::File(root) => Ok(root.join(key).exists()),
            Upstream::Http(_) => {
                let url = self.url_of(key);
                let resp = client
                    .head(&url)
                    .send()
                    .map_err(|e| format!("{url}: {e}"))?;
                Ok(resp.status().is_success())
            }
        }
    }

    /// Stores `src` (a file) or `data` under `key`, atomically: readers see all or nothing.
    fn put(&self, key: &str, src: Option<&Path>, data: &[u8]) -> Result<(), String> {
        match self {
            Upstream::File(root) => {
                let path = root.join(key);
                let dir = path.parent().expect("keys have a directory");
                fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), rand_u64()));
                let res = (|| -> std::io::Result<()> {
                    match src {
                        Some(s) => {
                            fs::copy(s, &tmp)?;
                        }
                        None => fs::write(&tmp, data)?,
                    }
                    File::open(&tmp)?.sync_all()?;
                    fs::rename(&tmp, &path)
                })();
                if let Err(e) = res {
                    let _ = fs::remove_file(&tmp);
                    return Err(format!("{}: {e}", path.display()));
                }
                Ok(())
            }
            Upstream::Http(base) => Err(format!(
                "{base} is read-only (http upstreams cannot be pushed to)"
            )),
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most len bytes into the buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_le_bytes(b)
}

pub(crate) fn blob_key(h: &Hash) -> String {
    let hex = h.to_hex();
    format!("blobs/{}/{hex}", &hex[..2])
}

/// Settings for fetching.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// An open of a blob that cannot be fetched fails (EIO) after at most this long.
    pub timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig {
            timeout: Duration::from_secs(30),
        }
    }
}

/// One download in progress; everyone who wants the same blob waits for it.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

/// The upstreams of a store and the downloads in flight.
pub struct Remote {
    pub upstreams: Vec<Upstream>,
    pub config: FetchConfig,
    client: reqwest::blocking::Client,
    inflight: Mutex<HashMap<Hash, Arc<Flight>>>,
}

impl Remote {
    pub fn new(upstreams: Vec<Upstream>, config: FetchConfig) -> Result<Remote> {
        Ok(Remote {
            client: http_client(&config)?,
            upstreams,
            config,
            inflight: Mutex::new(HashMap::new()),
        })
    }
}

fn http_client(config: &FetchConfig) -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(config.timeout.min(Duration::from_secs(10)))
        // Per read and write, not for the whole transfer: a large file may take long, a
        // stalled one may not.
        .timeout(config.timeout.min(Duration::from_secs(15)))
        .build()
        .map_err(|e| Error::Remote(format!("building the HTTP client: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes to a file while hashing.
struct HashingWriter<'a> {
    file: &'a mut File,
    hasher: blake3::Hasher,
    len: u64,
    limit: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other(
                "upstream sent more bytes than the blob has",
            ));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Store {
    /// Sets the upstreams blobs are fetched from.
    pub fn set_remote(&self, remote: Remote) {
        *lock(&self.remote) = Some(Arc::new(remote));
    }

    pub fn remote(&self) -> Option<Arc<Remote>> {
        lock(&self.remote).clone()
    }

    /// Makes blob `h` local, downloading it if only a remote copy exists. Concurrent callers
    /// for the same blob share one download. Returns whether this call downloaded it.
    pub fn ensure_local(&self, h: &Hash) -> Result<bool> {
        let row: Option<(i64, i64)> = self
            .conn()
            .query_row(
                "SELECT size, state FROM blobs WHERE hash = ?1",
                [&h.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((size, state)) = row else {
            return Ok(false);
        };
        if state != 1 {
            return Ok(false);
        }
        let Some(remote) = self.remote() else {
            return Err(Error::Fetch {
                hash: *h,
                reason: "only a remote copy exists and this mount has no upstream".into(),
            });
        };
        let (flight, leader) = {
            let mut m = lock(&remote.inflight);
            match m.get(h) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    m.insert(*h, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut done = lock(&flight.done);
            while done.is_none() {
                done = flight.cv.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            return match done.as_ref().expect("set before notify") {
                Ok(()) => Ok(false),
                Err(e) => Err(Error::Fetch {
                    hash: *h,
                    reason: e.clone(),
                }),
            };
        }
        let res = self.download(&remote, h, size as u64);
        *lock(&flight.done) = Some(res.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        lock(&remote.inflight).remove(h);
        flight.cv.notify_all();
        res.map(|_| true)
    }

    /// Tries every upstream in order, with retries and jittered backoff for transient errors,
    /// within the configured time bound.
    fn download(&self, remote: &Remote, h: &Hash, size: u64) -> Result<()> {
        let deadline = Instant::now() + remote.config.timeout;
        let key = blob_key(h);
        let mut errors = Vec::new();
        for up in &remote.upstreams {
            let mut delay = Duration::from_millis(100);
            for attempt in 0..4 {
                if Instant::now() >= deadline {
                    break;
                }
                let (mut file, path) = self.new_staging()?;
                let mut w = HashingWriter {
                    file: &mut file,
                    hasher: blake3::Hasher::new(),
                    len: 0,
                    limit: size,
                };
                let got = up.get_to(&remote.client, &key, &mut w);
                let (got_hash, len) = (Hash(*w.hasher.finalize().as_bytes()), w.len);
                match got {
                    Ok(_) if got_hash == *h && len == size => {
                        self.adopt_fetched(h, &path, &file)?;
                        tracing::info!(hash = %h, bytes = size, upstream = %up, "fetched blob");
                        return Ok(());
                    }
                    Ok(_) => {
                        let _ = fs::remove_file(&path);
                        tracing::error!(hash = %h, url = %up.url_of(&key), got = %got_hash, bytes = len, "upstream sent wrong bytes; not cached");
                        errors.push(format!("{}: wrong content", up.url_of(&key)));
                        break;
                    }
                    Err(GetError::Missing) => {
                        let _ = fs::remove_file(&path);
                        errors.push(format!("{}: not found", up.url_of(&key)));
                        break;
                    }
                    Err(GetError::Fatal(e)) => {
                        let _ = fs::remove_file(&path);
                        errors.push(e);
                        break;
                    }
                    Err(GetError::Transient(e)) => {
                        let _ = fs::remove_file(&path);
                        tracing::warn!(hash = %h, attempt, error = %e, "fetch failed; retrying");
                        errors.push(e);
                        let jitter =
                            Duration::from_millis(rand_u64() % (delay.as_millis() as u64 + 1));
                        let now = Instant::now();
                        if now + delay + jitter >= deadline {
                            break;
                        }
                        std::thread::sleep(delay + jitter);
                        delay *= 2;
                    }
                }
            }
        }
        if errors.is_empty() {
            errors.push(format!(
                "no upstream answered within {:?}",
                remote.config.timeout
            ));
        }
        Err(Error::Fetch {
            hash: *h,
            reason: errors.join("; "),
        })
    }

    /// Moves a downloaded, verified blob into place and marks it local.
    fn adopt_fetched(&self, h: &Hash, path: &Path, file: &File) -> Result<()> {
        let blob_path = self.blob_path(h);
        let dir = blob_path.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .ctx(|| format!("sealing {}", path.display()))?;
        let conn = self.conn();
        fs::rename(path, &blob_path).ctx(|| format!("renaming {} to blob {h}", path.display()))?;
        let ino = fs::metadata(&blob_path)
            .ctx(|| format!("stat of {}", blob_path.display()))?
            .ino() as i64;
        conn.execute(
            "UPDATE blobs SET state = 0, file_ino = ?2, last_access = ?3 WHERE hash = ?1",
            params![&h.0[..], ino, self.next_access_seq()],
        )?;
        Ok(())
    }

    /// True when blob `h` exists only on an upstream right now.
    pub fn is_remote_only(&self, h: &Hash) -> bool {
        self.conn()
            .query_row("SELECT state FROM blobs WHERE hash = ?1", [&h.0[..]], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok_and(|s| s == 1)
    }

    /// Marks blobs as having a copy on an upstream (so eviction may drop only the local bytes).
    pub(crate) fn mark_remote(&self, hashes: &[Hash]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for h in hashes {
            tx.execute("UPDATE blobs SET remote = 1 WHERE hash = ?1", [&h.0[..]])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Reads object `key` from the first upstream that has it.
    pub(crate) fn get_object(remote: &Remote, key: &str) -> Result<Vec<u8>> {
        let mut errors = Vec::new();
        for up in &remote.upstreams {
            match up.get_bytes(&remote.client, key) {
                Ok(Some(b)) => return Ok(b),
                Ok(None) => errors.push(format!("{}: not found", up.url_of(key))),
                Err(e) => errors.push(e),
            }
        }
        Err(Error::Remote(errors.join("; ")))
    }

    pub(crate) fn put_object(
        up: &Upstream,
        key: &str,
        src: Option<&Path>,
        data: &[u8],
    ) -> Result<()> {
        up.put(key, src, data).map_err(Error::Remote)
    }

    pub(crate) fn has_object(remote: &Remote, up: &Upstream, key: &str) -> Result<bool> {
        up.has(&remote.client, key).map_err(Error::Remote)
    }
}
