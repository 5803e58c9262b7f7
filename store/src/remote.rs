//! The remote tier: upstreams that hold blobs and volume snapshots, and fetching a blob that
//! is only there (state `remote`) into the local store on first use.
//!
//! Remote layout (the same on every kind of upstream):
//! - `blobs/<2 hex>/<64 hex>`: a blob's bytes, named by their BLAKE3 hash (uncompressed, so a
//!   ranged read works);
//! - `manifests/<64 hex>`: a gzip-compressed JSON snapshot of a volume's namespace, named by the
//!   BLAKE3 hash of the compressed bytes;
//! - `tags/<name>`: the hash of a manifest (text), the mutable pointer that `pull` follows.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::objstore::{ObjError, ObjStore};
use crate::{Hash, Store};

/// One place blobs and manifests can come from (and, except `http(s)://`, go to).
///
/// Object stores (`s3://`, `gs://`, `az://`) all go through `objstore.rs`. `file://` and
/// `http(s)://` stay hand-written here, where object_store's `LocalFileSystem` and
/// `HttpStore` cannot do the job:
/// - `http(s)://` is any static server, and many (`python3 -m http.server`, some CDNs)
///   answer a ranged GET with the whole object: kcache then reads past the prefix for a
///   whole-blob fetch, or reports `GetError::NoRange` for a far read, where `HttpStore`
///   fails the request (`NotPartial`); and it lists and writes only over WebDAV (PROPFIND,
///   MKCOL, PUT), which kcache's read-only HTTP upstreams never need.
/// - `file://` reads are a plain `File` (seek, then read straight into the caller's
///   buffer), where `LocalFileSystem` would hand every chunk across the shared runtime on a
///   blocking task; its puts are `fs::copy` (copy_file_range / reflink) + fsync + rename,
///   where `LocalFileSystem` copies through memory; and a tag update needs the `flock` of
///   `tags.rs` anyway, since `LocalFileSystem` has no conditional update
///   (`PutMode::Update` is not implemented there).
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A directory, e.g. on NFS: read and write.
    File(PathBuf),
    /// Any static HTTP server (or `kcache serve`): read-only.
    Http(String),
    /// An object store bucket or container (and key prefix), `s3://`, `gs://` or `az://`:
    /// read and write, through the one client of `objstore.rs`.
    Object(Arc<ObjStore>),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::File(p) => write!(f, "file://{}", p.display()),
            Upstream::Http(u) => f.write_str(u),
            Upstream::Object(s) => f.write_str(s.url_of("").trim_end_matches('/')),
        }
    }
}

/// Why a read from an upstream did not produce the object.
#[derive(Debug)]
pub(crate) enum GetError {
    /// The upstream answered that it does not have it.
    Missing,
    /// Worth another try (network, 5xx, timeout).
    Transient(String),
    /// Not worth retrying here (4xx other than 404, local I/O).
    Fatal(String),
    /// A ranged read was answered with the whole object.
    NoRange,
}

impl From<ObjError> for GetError {
    fn from(e: ObjError) -> GetError {
        match e {
            ObjError::Missing => GetError::Missing,
            ObjError::Transient(m) => GetError::Transient(m),
            ObjError::Fatal(m) => GetError::Fatal(m),
        }
    }
}

impl Upstream {
    /// An upstream from its URL, with the default timeout and this process's environment
    /// (for object stores: credentials, region and endpoint).
    pub fn parse(url: &str) -> Result<Upstream, String> {
        Upstream::parse_with(url, FetchConfig::default().timeout, None)
    }

    /// An upstream from its URL. `timeout` bounds each request's idle time (object stores;
    /// HTTP takes it from the `Remote`'s client); `env`, when given, replaces this process's
    /// environment for the object store settings (AWS_*, GOOGLE_*, STORAGE_EMULATOR_HOST,
    /// AZURE_*): a daemon acting for a command uses the command's.
    pub fn parse_with(
        url: &str,
        timeout: Duration,
        env: Option<&[(String, String)]>,
    ) -> Result<Upstream, String> {
        if let Some(p) = url.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(format!("upstream '{url}': file:// needs an absolute path"));
            }
            return Ok(Upstream::File(PathBuf::from(p)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Ok(Upstream::Http(url.trim_end_matches('/').to_owned()));
        }
        let object = if url.starts_with("s3://") {
            crate::s3::parse_in(url, timeout, env)
        } else if url.starts_with("gs://") {
            crate::gcs::parse_in(url, timeout, env)
        } else if url.starts_with("az://") {
            crate::azure::parse_in(url, timeout, env)
        } else {
            return Err(format!(
                "upstream '{url}': expected file:///path, http(s)://host/prefix, s3://bucket/prefix, \
                 gs://bucket/prefix or az://container/prefix"
            ));
        };
        object.map(|s| Upstream::Object(Arc::new(s)))
    }

    pub(crate) fn url_of(&self, key: &str) -> String {
        match self {
            Upstream::File(p) => p.join(key).display().to_string(),
            Upstream::Http(base) => format!("{base}/{key}"),
            Upstream::Object(s) => s.url_of(key),
        }
    }

    /// Object `key` from byte `start` (to `end`, exclusive, or to its end) as a stream. A
    /// server that ignores the range sends the whole object: with `allow_skip` its first
    /// `start` bytes are read and dropped, otherwise that is `GetError::NoRange`.
    pub(crate) fn open_read(
        &self,
        client: &reqwest::blocking::Client,
        key: &str,
        start: u64,
        end: Option<u64>,
        allow_skip: bool,
    ) -> Result<Box<dyn Read + Send>, GetError> {
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
                if start > 0 {
                    f.seek(SeekFrom::Start(start))
                        .map_err(|e| GetError::Transient(format!("{}: {e}", path.display())))?;
                }
                Ok(match end {
                    Some(end) => Box::new(f.take(end.saturating_sub(start))),
                    None => Box::new(f),
                })
            }
            Upstream::Http(_) => {
                let url = self.url_of(key);
                let mut req = client.get(&url);
                let ranged = start > 0 || end.is_some();
                if ranged {
                    let last = end.map(|e| (e - 1).to_string()).unwrap_or_default();
                    req = req.header(reqwest::header::RANGE, format!("bytes={start}-{last}"));
                }
                let resp = req
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
                let mut body: Box<dyn Read + Send> = Box::new(resp);
                if ranged && status != reqwest::StatusCode::PARTIAL_CONTENT {
                    // The whole object came back.
                    if start > 0 {
                        if !allow_skip {
                            return Err(GetError::NoRange);
                        }
                        let skipped =
                            std::io::copy(&mut (&mut body).take(start), &mut std::io::sink())
                                .map_err(|e| GetError::Transient(format!("{url}: {e}")))?;
                        if skipped < start {
                            return Err(GetError::Transient(format!("{url}: body ended early")));
                        }
                    }
                    if let Some(end) = end {
                        body = Box::new(body.take(end - start));
                    }
                }
                Ok(body)
            }
            Upstream::Object(s) => {
                // Object stores honour ranges, so nothing is ever skipped.
                let range = (start > 0 || end.is_some()).then_some((start, end));
                Ok(s.get(key, range)?)
            }
        }
    }

    /// Streams object `key` into `out`; returns the bytes written.
    fn get_to(
        &self,
        client: &reqwest::blocking::Client,
        key: &str,
        out: &mut dyn Write,
    ) -> Result<u64, GetError> {
        let mut r = self.open_read(client, key, 0, None, true)?;
        std::io::copy(&mut r, out)
            .map_err(|e| GetError::Transient(format!("{}: {e}", self.url_of(key))))
    }

    pub(crate) fn get_bytes(
        &self,
        client: &reqwest::blocking::Client,
        key: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut buf = Vec::new();
        match self.get_to(client, key, &mut buf) {
            Ok(_) => Ok(Some(buf)),
            Err(GetError::Missing) => Ok(None),
            Err(GetError::Transient(e) | GetError::Fatal(e)) => Err(e),
            Err(GetError::NoRange) => Err(format!("{}: range ignored", self.url_of(key))),
        }
    }

    /// Every key under `prefix` (which ends in '/').
    fn list(&self, prefix: &str) -> Result<HashSet<String>, String> {
        match self {
            Upstream::File(root) => {
                let mut out = HashSet::new();
                let mut stack = vec![prefix.trim_end_matches('/').to_owned()];
                while let Some(rel) = stack.pop() {
                    let dir = root.join(&rel);
                    let rd = match fs::read_dir(&dir) {
                        Ok(rd) => rd,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(format!("{}: {e}", dir.display())),
                    };
                    for ent in rd {
                        let ent = ent.map_err(|e| format!("{}: {e}", dir.display()))?;
                        let name = ent.file_name().to_string_lossy().into_owned();
                        if name.starts_with(".tmp-") {
                            continue;
                        }
                        let key = format!("{rel}/{name}");
                        if ent.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(key);
                        } else {
                            out.insert(key);
                        }
                    }
                }
                Ok(out)
            }
            Upstream::Object(s) => s
                .list(prefix)
                .map(|keys| keys.into_iter().collect())
                .map_err(|e| e.to_string()),
            Upstream::Http(base) => Err(format!(
                "{base} is read-only (http upstreams cannot be pushed to)"
            )),
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
                    fs::rename(&tmp, &path)?;
                    // The name too: a push marks its blobs as held upstream, after which
                    // eviction may drop the local copy, so the upstream's copy must survive
                    // a power loss whole, name included.
                    File::open(dir)?.sync_all()
                })();
                if let Err(e) = res {
                    let _ = fs::remove_file(&tmp);
                    return Err(format!("{}: {e}", path.display()));
                }
                Ok(())
            }
            // A PUT replaces an object whole: readers see the old one or the new one.
            Upstream::Object(s) => match src {
                Some(path) => s.put_file(key, path),
                None => s.put_bytes(key, data),
            }
            .map_err(|e| e.to_string()),
            Upstream::Http(base) => Err(format!(
                "{base} is read-only (http upstreams cannot be pushed to)"
            )),
        }
    }
}

pub(crate) fn rand_u64() -> u64 {
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

/// Where blobs are fetched from: upstreams in order, the fetch settings, and the HTTP client
/// over them. Only that: the downloads in flight are the store's (`downloads.rs`), so each
/// mount can have a `Remote` of its own (its `upstream=` options) while every download is
/// still shared and drained store-wide. Passed to each fetch (`Store::fetch`,
/// `ensure_local`) and to pushes and pulls.
pub struct Remote {
    pub upstreams: Vec<Upstream>,
    pub config: FetchConfig,
    pub(crate) client: reqwest::blocking::Client,
}

impl Remote {
    pub fn new(upstreams: Vec<Upstream>, config: FetchConfig) -> Result<Remote> {
        Ok(Remote {
            client: http_client(&config)?,
            upstreams,
            config,
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// True when blob `h` exists only on an upstream right now.
    pub fn is_remote_only(&self, h: &Hash) -> bool {
        // A failed read answers "not remote-only": the caller then opens the blob file, which
        // fails with the error itself rather than starting a download on a guess.
        crate::lifecycle::row(&self.conn(), h)
            .is_ok_and(|r| r.is_some_and(|r| r.state == crate::BlobState::RemoteOnly))
    }

    /// Marks blobs as having a copy on an upstream (so eviction may drop only the local bytes).
    pub(crate) fn mark_remote(&self, hashes: &[Hash]) -> Result<()> {
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        for h in hashes {
            crate::lifecycle::mark_upstream(&tx, h)?;
        }
        self.commit_tx(tx)?;
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

    /// Every key under `prefix` on `up` (for existence checks in bulk).
    pub(crate) fn list_objects(up: &Upstream, prefix: &str) -> Result<HashSet<String>> {
        up.list(prefix).map_err(Error::Remote)
    }
}
