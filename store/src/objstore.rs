//! Object storage as an upstream (S3-compatible stores, Google Cloud Storage, Azure Blob):
//! one blocking client over any `object_store::ObjectStore`, for callers on plain OS threads.
//! Each kind of store has its own module for its URL and settings (`s3.rs`, `gcs.rs`,
//! `azure.rs`) and builds its `ObjectStore`s; everything after that is here: ranged streaming
//! reads with idle timeouts, deadlines, multipart uploads, conditional puts, listing, and the
//! classification of errors into missing / transient / fatal.

use std::fmt;
use std::future::Future;
use std::io::{self, Read};
use std::path::Path as FsPath;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};

pub use object_store::UpdateVersion;

/// Why a request to an object store failed.
#[derive(Debug)]
pub enum ObjError {
    /// The object does not exist (404 / NotFound).
    Missing,
    /// Worth another try: network errors, timeouts, 5xx, 429/503 SlowDown.
    Transient(String),
    /// Not worth retrying: 403, bad request, bad configuration, local I/O errors.
    Fatal(String),
}

impl fmt::Display for ObjError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjError::Missing => f.write_str("not found"),
            ObjError::Transient(m) | ObjError::Fatal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ObjError {}

/// Objects larger than this are uploaded in parts.
const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// S3 wants parts of at least 5 MiB (but the last) and at most 10,000 of them.
const MIN_PART: u64 = 8 << 20;
const MAX_PARTS: u64 = 9_000;
/// Parts uploading at once; each holds its bytes in memory until it is sent.
const PART_CONCURRENCY: usize = 3;
/// The HTTP stack has no idle timer for the sending side of a request, so an upload gets a
/// deadline from its size instead, at a rate slow enough that only a stalled link misses it.
const MIN_UPLOAD_RATE: f64 = 64.0 * 1024.0;

/// An object's bytes and its version as the store names it (the ETag; on GCS also the
/// generation), which a conditional put replaces.
pub type Versioned = (Vec<u8>, UpdateVersion);

/// A bucket or container (and key prefix) that holds blobs, manifests and tags.
pub struct ObjStore {
    /// The upstream's URL (`s3://bucket/prefix`), for messages.
    base: String,
    /// What a LIST that answers 404 means is missing ("bucket 'x'").
    container: String,
    /// No leading or trailing '/'; empty for the bucket's root.
    prefix: String,
    /// GETs, HEADs and LISTs: the read timeout of the HTTP client catches a stalled response.
    reader: Arc<dyn ObjectStore>,
    /// PUTs: no read timeout, because the response only starts once the whole body is sent,
    /// which may take longer than `timeout`; each request gets a size-based deadline instead.
    writer: Arc<dyn ObjectStore>,
    timeout: Duration,
}

impl fmt::Debug for ObjStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjStore")
            .field("url", &self.base)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The parts of a store URL after the scheme: `bucket[/prefix]` → (bucket, prefix without
/// surrounding '/'), with the prefix checked as an object path.
pub(crate) fn split_url<'a>(
    url: &str,
    rest: &'a str,
    form: &str,
) -> Result<(&'a str, String), String> {
    if rest.contains(['?', '#']) {
        return Err(format!(
            "upstream '{url}': query strings and fragments are not part of the URL (expected {form})"
        ));
    }
    let (first, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if first.is_empty() {
        return Err(format!(
            "upstream '{url}': no bucket name (expected {form})"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() && Path::parse(prefix).is_err() {
        return Err(format!(
            "upstream '{url}': invalid prefix '{prefix}' (empty, '.' or '..' segments, or control characters)"
        ));
    }
    Ok((first, prefix.to_owned()))
}

/// Bucket and container names: broader than any one store's rules, but nothing that could
/// change the meaning of a request URL.
pub(crate) fn valid_bucket(url: &str, name: &str, form: &str) -> Result<(), String> {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        Ok(())
    } else {
        Err(format!(
            "upstream '{url}': '{name}' is not a valid bucket or container name (expected {form})"
        ))
    }
}

/// HTTP client options for a store's reader (`reader`: with a read timeout) or writer.
pub(crate) fn client_options(timeout: Duration, reader: bool) -> ClientOptions {
    let opts = ClientOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout_disabled();
    if reader {
        opts.with_read_timeout(timeout)
    } else {
        opts
    }
}

/// object_store retries 5xx, throttling and network errors itself; keep that short so that
/// the caller's own retries and failover to another upstream stay in charge.
pub(crate) fn retry_config(timeout: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: timeout.clamp(Duration::from_millis(100), Duration::from_secs(2)),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: timeout,
    }
}

/// A store's reader and writer (see `ObjStore`).
pub(crate) type StorePair = (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>);

/// Builds a store's reader and writer inside the shared runtime (the HTTP client may look
/// for one while it is built).
pub(crate) fn build_pair<T, E: std::error::Error + 'static>(
    url: &str,
    build: impl Fn(bool) -> Result<T, E>,
) -> Result<StorePair, String>
where
    T: ObjectStore,
{
    let rt = runtime().map_err(|e| format!("upstream '{url}': {e}"))?;
    let _entered = rt.enter();
    let one = |reader| {
        build(reader)
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            .map_err(|e| format!("upstream '{url}': {}", error_text(&e)))
    };
    Ok((one(true)?, one(false)?))
}

/// One runtime for every bucket: the HTTP connections live on it, and callers (FUSE request
/// threads, fetch threads) block on it; two workers are plenty for network waits.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kcache-s3")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the S3 client runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `fut` to completion on the shared runtime from a plain thread.
fn block_on<F: Future>(fut: F) -> Result<F::Output, ObjError> {
    // block_on inside a runtime panics; refusing keeps a misuse from taking the process down.
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(ObjError::Fatal(
            "the blocking S3 client was called from inside an async runtime".into(),
        ));
    }
    Ok(runtime().map_err(ObjError::Fatal)?.block_on(fut))
}

/// `fut` under a deadline; running out is worth another try. (An async fn, so that the timer
/// is created inside the runtime, as tokio requires.)
async fn deadline<T>(
    limit: Duration,
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, ObjError>>,
) -> Result<T, ObjError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ObjError::Transient(format!(
            "{}: no answer within {limit:?}",
            what()
        ))),
    }
}

impl ObjStore {
    /// A client over `reader` and `writer` (see `build_pair`), which name the same bucket.
    /// `base` is the upstream's URL without a trailing '/', `container` what its bucket is
    /// called in messages. `timeout` bounds connecting and each request's idle time.
    pub(crate) fn new(
        base: String,
        container: String,
        prefix: String,
        (reader, writer): StorePair,
        timeout: Duration,
    ) -> Result<ObjStore, String> {
        if timeout.is_zero() {
            return Err(format!(
                "upstream '{base}': the timeout must be more than zero"
            ));
        }
        Ok(ObjStore {
            base,
            container,
            prefix,
            reader,
            writer,
            timeout,
        })
    }

    fn base_url(&self) -> String {
        self.base.clone()
    }

    /// The URL of `key` for log lines and error messages: s3://bucket/prefix/key.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn path(&self, key: &str) -> Result<Path, ObjError> {
        // object_store would quietly drop a leading or trailing '/', naming another object.
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(ObjError::Fatal(format!(
                "{}: invalid object key '{key}'",
                self.base_url()
            )));
        }
        Path::parse(self.full_key(key))
            .map_err(|e| ObjError::Fatal(format!("{}: invalid object key: {e}", self.url_of(key))))
    }

    /// The budget for one request that is not a data transfer, with object_store's own
    /// retries (bounded by `timeout`) inside it.
    fn request_deadline(&self) -> Duration {
        self.timeout.saturating_mul(3)
    }

    fn upload_deadline(&self, bytes: u64) -> Duration {
        self.timeout
            .saturating_add(Duration::from_secs_f64(bytes as f64 / MIN_UPLOAD_RATE))
    }

    /// The object at `key`, streamed as a blocking reader. `range`: None = whole object;
    /// Some((start, None)) = from start to the end; Some((start, Some(end))) = bytes
    /// start..end (end exclusive). A read that stalls longer than the timeout fails.
    pub fn get(
        &self,
        key: &str,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Box<dyn Read + Send>, ObjError> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let range = match range {
            None | Some((0, None)) => None,
            Some((start, None)) => Some(GetRange::Offset(start)),
            Some((start, Some(end))) if end > start => Some(GetRange::Bounded(start..end)),
            Some((start, Some(end))) if end == start => {
                // S3 cannot express an empty range; the object must still exist.
                return if self.head(key)? {
                    Ok(Box::new(io::empty()))
                } else {
                    Err(ObjError::Missing)
                };
            }
            Some((start, Some(end))) => {
                return Err(ObjError::Fatal(format!(
                    "{url}: invalid range {start}..{end}"
                )))
            }
        };
        let store = self.reader.clone();
        let opts = GetOptions::new().with_range(range);
        let res = block_on(deadline(self.request_deadline(), || url.clone(), async {
            store
                .get_opts(&path, opts)
                .await
                .map_err(|e| classify(&url, e))
        }))??;
        Ok(Box::new(ObjectReader {
            remaining: res.range.end - res.range.start,
            stream: res.into_stream(),
            leftover: Bytes::new(),
            timeout: self.timeout,
            url,
            done: false,
        }))
    }

    /// Whether `key` exists.
    pub fn head(&self, key: &str) -> Result<bool, ObjError> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let store = self.reader.clone();
        block_on(deadline(self.request_deadline(), || url.clone(), async {
            match store.head(&path).await {
                Ok(_) => Ok(true),
                Err(e) => match classify(&url, e) {
                    ObjError::Missing => Ok(false),
                    e => Err(e),
                },
            }
        }))?
    }

    /// Object `key` whole with its version (what a conditional put replaces), or None.
    pub fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, ObjError> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let store = self.writer.clone();
        let res = block_on(deadline(self.request_deadline(), || url.clone(), async {
            match store.get_opts(&path, GetOptions::new()).await {
                Ok(r) => {
                    let version = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let bytes = r.bytes().await.map_err(|e| classify(&url, e))?;
                    Ok(Some((bytes.to_vec(), version)))
                }
                Err(e) => match classify(&url, e) {
                    ObjError::Missing => Ok(None),
                    e => Err(e),
                },
            }
        }))?;
        res
    }

    /// Stores `data` under `key` only if the object is still the version `expected` names
    /// (`None`: only if there is no object yet). False when another writer got there first.
    /// The store evaluates the condition (S3 and Azure: `If-Match` on the ETag /
    /// `If-None-Match: *`; GCS: `x-goog-if-generation-match` on the generation), so concurrent
    /// writers on any machine exclude each other.
    pub fn put_if(
        &self,
        key: &str,
        data: &[u8],
        expected: Option<&UpdateVersion>,
    ) -> Result<bool, ObjError> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let store = self.writer.clone();
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v.clone()),
        };
        let opts = PutOptions::from(mode);
        let payload = PutPayload::from(data.to_vec());
        block_on(deadline(
            self.upload_deadline(data.len() as u64),
            || url.clone(),
            async {
                match store.put_opts(&path, payload, opts).await {
                    Ok(_) => Ok(true),
                    Err(
                        object_store::Error::Precondition { .. }
                        | object_store::Error::AlreadyExists { .. },
                    ) => Ok(false),
                    Err(e) => Err(classify_write(&url, e)),
                }
            },
        ))?
    }

    /// Stores `data` under `key`.
    pub fn put_bytes(&self, key: &str, data: &[u8]) -> Result<(), ObjError> {
        self.put_from(key, &mut &data[..], data.len() as u64, &|e| {
            ObjError::Fatal(format!("reading the data to upload: {e}"))
        })
    }

    /// Stores the file at `path` under `key`; large files go in parts, streamed from disk.
    /// Readers see the old object or the new one, never a mix: S3 semantics give that.
    pub fn put_file(&self, key: &str, path: &FsPath) -> Result<(), ObjError> {
        let local = |e: io::Error| ObjError::Fatal(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(local)?;
        let len = file.metadata().map_err(local)?.len();
        self.put_from(key, &mut file, len, &local)
    }

    fn put_from(
        &self,
        key: &str,
        src: &mut dyn Read,
        len: u64,
        local: &dyn Fn(io::Error) -> ObjError,
    ) -> Result<(), ObjError> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        if len <= MULTIPART_THRESHOLD {
            let mut buf = Vec::with_capacity(len as usize);
            src.take(len + 1).read_to_end(&mut buf).map_err(local)?;
            if buf.len() as u64 != len {
                return Err(local(changed_size(len, buf.len() as u64)));
            }
            let store = self.writer.clone();
            let payload = PutPayload::from(buf);
            return block_on(deadline(self.upload_deadline(len), || url.clone(), async {
                store
                    .put(&path, payload)
                    .await
                    .map(drop)
                    .map_err(|e| classify_write(&url, e))
            }))?;
        }

        let store = self.writer.clone();
        let mut upload = block_on(deadline(self.request_deadline(), || url.clone(), async {
            store
                .put_multipart_opts(&path, PutMultipartOptions::default())
                .await
                .map_err(|e| classify_write(&url, e))
        }))??;
        let sent = self.send_parts(&mut *upload, src, len, &url, local);
        let done = sent.and_then(|()| {
            // S3 may take a while to assemble a large object.
            let limit = self
                .request_deadline()
                .saturating_add(Duration::from_secs(len / (8 << 20)));
            block_on(deadline(limit, || url.clone(), async {
                upload
                    .complete()
                    .await
                    .map(drop)
                    .map_err(|e| classify_write(&url, e))
            }))?
        });
        if done.is_err() {
            // Unfinished uploads keep their parts (and cost storage) until aborted.
            let limit = self.request_deadline();
            let _ = block_on(async { tokio::time::timeout(limit, upload.abort()).await });
        }
        done
    }

    /// Reads `src` in parts and uploads them, a few at a time, so memory stays bounded.
    fn send_parts(
        &self,
        upload: &mut dyn MultipartUpload,
        src: &mut dyn Read,
        len: u64,
        url: &str,
        local: &dyn Fn(io::Error) -> ObjError,
    ) -> Result<(), ObjError> {
        let part_size = MIN_PART.max(len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
        let rt = runtime().map_err(ObjError::Fatal)?;
        let mut in_flight = std::collections::VecDeque::new();
        let mut sent = 0u64;
        let wait = |h: tokio::task::JoinHandle<Result<(), ObjError>>| -> Result<(), ObjError> {
            match block_on(h)? {
                Ok(r) => r,
                Err(e) => Err(ObjError::Transient(format!(
                    "{url}: part upload failed: {e}"
                ))),
            }
        };
        let res = loop {
            let mut buf = Vec::with_capacity(part_size as usize);
            if let Err(e) = src.take(part_size).read_to_end(&mut buf) {
                break Err(local(e));
            }
            if buf.is_empty() {
                break if sent == len {
                    Ok(())
                } else {
                    Err(local(changed_size(len, sent)))
                };
            }
            sent += buf.len() as u64;
            if sent > len {
                break Err(local(changed_size(len, sent)));
            }
            let limit = self.upload_deadline(buf.len() as u64);
            let part = upload.put_part(PutPayload::from(buf));
            let what = url.to_owned();
            in_flight.push_back(rt.spawn(async move {
                deadline(limit, || format!("{what}: uploading a part"), async {
                    part.await.map_err(|e| classify_write(&what, e))
                })
                .await
            }));
            if in_flight.len() >= PART_CONCURRENCY {
                if let Err(e) = wait(in_flight.pop_front().expect("not empty")) {
                    break Err(e);
                }
            }
        };
        let mut res = res;
        while let Some(h) = in_flight.pop_front() {
            if res.is_ok() {
                res = wait(h);
            } else {
                // A dropped JoinHandle would leave its part uploading.
                h.abort();
            }
        }
        res
    }

    /// Every key under `prefix` (relative to the upstream prefix), for bulk existence checks:
    /// one LIST pages through a thousand keys where HEADs would take one request each.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ObjError> {
        let full = self.full_key(prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let url = self.url_of(prefix);
        let store = self.reader.clone();
        let limit = self.request_deadline();
        // Listing pages through the keys (a thousand a request) as the stream is read; each
        // page gets the deadline of one request.
        let res = block_on(async {
            let under = Path::from(full.trim_end_matches('/'));
            let mut stream = store.list(Some(&under));
            let mut keys = Vec::new();
            loop {
                let next = tokio::time::timeout(limit, stream.next()).await;
                match next {
                    Err(_) => {
                        return Err(ObjError::Transient(format!(
                            "{url}: no answer within {limit:?}"
                        )))
                    }
                    Ok(None) => return Ok(keys),
                    Ok(Some(Err(e))) => return Err(classify(&url, e)),
                    Ok(Some(Ok(meta))) => {
                        if let Some(k) = meta.location.as_ref().strip_prefix(&strip) {
                            keys.push(k.to_owned());
                        }
                    }
                }
            }
        })?;
        match res {
            // A LIST answers 404 only when the bucket itself is missing.
            Err(ObjError::Missing) => Err(ObjError::Fatal(format!(
                "{url}: {} does not exist",
                self.container
            ))),
            r => r,
        }
    }
}

fn changed_size(expected: u64, got: u64) -> io::Error {
    io::Error::other(format!(
        "size changed while uploading (expected {expected} bytes, read {got})"
    ))
}

/// The body of a GET as a blocking reader: pulls one chunk at a time from the response
/// stream, so memory stays at one network chunk whatever the object's size.
struct ObjectReader {
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    leftover: Bytes,
    /// Bytes the response promised and has not delivered yet.
    remaining: u64,
    timeout: Duration,
    url: String,
    done: bool,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.leftover.is_empty() {
            if self.done {
                return Ok(0);
            }
            // Built inside the runtime: a timer cannot be created outside one.
            let (limit, stream) = (self.timeout, &mut self.stream);
            let next = block_on(async { tokio::time::timeout(limit, stream.next()).await })
                .map_err(|e| io::Error::other(e.to_string()))?;
            match next {
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{}: no data for {:?}", self.url, self.timeout),
                    ))
                }
                Ok(None) => {
                    self.done = true;
                    if self.remaining > 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "{}: the response ended {} bytes early",
                                self.url, self.remaining
                            ),
                        ));
                    }
                }
                Ok(Some(Err(e))) => {
                    // The stream ends after an error, so a further read reports the
                    // shortfall rather than a clean end.
                    let (kind, m) = match classify(&self.url, e) {
                        ObjError::Missing => return Err(io::ErrorKind::NotFound.into()),
                        ObjError::Transient(m) => (io::ErrorKind::Other, m),
                        ObjError::Fatal(m) => (io::ErrorKind::InvalidData, m),
                    };
                    return Err(io::Error::new(kind, m));
                }
                Ok(Some(Ok(chunk))) => {
                    self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                    self.leftover = chunk;
                }
            }
        }
        let n = buf.len().min(self.leftover.len());
        buf[..n].copy_from_slice(&self.leftover.split_to(n));
        Ok(n)
    }
}

/// An error's message with its causes, each once.
pub(crate) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cur = s.source();
    }
    text
}

/// This process's environment, as far as it is text.
pub(crate) fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// The variables of this process's environment that object store settings are read from
/// (AWS, Google and Azure): what a command hands to the daemon acting for it.
pub fn settings_env() -> Vec<(String, String)> {
    process_env()
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("AWS_")
                || k.starts_with("GOOGLE_")
                || k.starts_with("AZURE_")
                || k == "STORAGE_EMULATOR_HOST"
                || k == "HOME"
        })
        .collect()
}

/// `text` with an S3 XML error document shortened to its code and message (request ids and
/// the XML itself only make log lines longer).
pub(crate) fn shorten_xml(text: &str) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else {
        return text.to_owned();
    };
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let from = text[start..].find(&open)? + start + open.len();
        let to = text[from..].find(&format!("</{name}>"))? + from;
        Some(text[from..to].trim().to_owned())
    };
    let end = text[start..]
        .find("</Error>")
        .map_or(text.len(), |i| start + i + "</Error>".len());
    let summary = match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c} ({m})"),
        (Some(c), None) => c,
        _ => return text.to_owned(),
    };
    format!("{}{summary}{}", &text[..start], &text[end..])
}

/// The HTTP status a request failed with, from object_store's message (its retry error type
/// is not public): "... status code: 503 Service Unavailable ...".
pub(crate) fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// A write has no object to miss: a 404 means the bucket (or the multipart upload) is gone.
/// Whether an error message says that the bucket or container itself is missing (S3 and GCS:
/// NoSuchBucket; Azure: ContainerNotFound): not a missing object, so not worth a failover
/// that treats it as one.
fn no_bucket(msg: &str) -> bool {
    msg.contains("NoSuchBucket") || msg.contains("ContainerNotFound")
}

fn classify_write(url: &str, e: object_store::Error) -> ObjError {
    let msg = shorten_xml(&format!("{url}: {}", error_text(&e)));
    match classify(url, e) {
        ObjError::Missing => ObjError::Fatal(msg),
        other => other,
    }
}

fn classify(url: &str, e: object_store::Error) -> ObjError {
    use object_store::Error as E;
    let msg = shorten_xml(&format!("{url}: {}", error_text(&e)));
    match &e {
        E::NotFound { .. } if no_bucket(&msg) => ObjError::Fatal(msg),
        E::NotFound { .. } => ObjError::Missing,
        E::Generic { .. } | E::JoinError { .. } => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = cur {
                // Connection refused or reset, timeouts, bodies cut short: all worth another try.
                if s.downcast_ref::<object_store::client::HttpError>()
                    .is_some()
                    || s.downcast_ref::<io::Error>().is_some()
                {
                    return ObjError::Transient(msg);
                }
                cur = s.source();
            }
            match status_in(&msg) {
                Some(404) if no_bucket(&msg) => ObjError::Fatal(msg),
                Some(404) => ObjError::Missing,
                Some(408 | 429) => ObjError::Transient(msg),
                Some(s) if s >= 500 => ObjError::Transient(msg),
                // S3's answer to a client that sent its body too slowly.
                Some(400) if msg.contains("RequestTimeout") => ObjError::Transient(msg),
                Some(_) => ObjError::Fatal(msg),
                // A 200 whose body is an error (InternalError, SlowDown).
                None if msg.contains("Server returned error response") => ObjError::Transient(msg),
                None if matches!(e, E::JoinError { .. }) => ObjError::Transient(msg),
                None => ObjError::Fatal(msg),
            }
        }
        _ => ObjError::Fatal(msg),
    }
}
