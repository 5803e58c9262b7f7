//! S3-compatible object storage (AWS S3, MinIO, Ceph RGW, Garage, R2, moto) as an upstream:
//! a blocking client over `object_store`, for callers on plain OS threads.
//!
//! Configuration follows the AWS conventions (environment, then the shared config and
//! credentials files) so that a machine already set up for the AWS CLI needs nothing more.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::{self, Read};
use std::path::{Path as FsPath, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, GetOptions, GetRange, MultipartUpload,
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};

/// Why an S3 request failed.
#[derive(Debug)]
pub enum S3Error {
    /// The object does not exist (404 / NotFound).
    Missing,
    /// Worth another try: network errors, timeouts, 5xx, 429/503 SlowDown.
    Transient(String),
    /// Not worth retrying: 403, bad request, bad configuration, local I/O errors.
    Fatal(String),
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Error::Missing => f.write_str("not found"),
            S3Error::Transient(m) | S3Error::Fatal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for S3Error {}

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

/// An object's bytes and its ETag, if the store gave one.
pub type Versioned = (Vec<u8>, Option<String>);

/// An S3 bucket (and key prefix) that holds blobs, manifests and tags.
pub struct S3 {
    bucket: String,
    /// No leading or trailing '/'; empty for the bucket's root.
    prefix: String,
    /// GETs, HEADs and LISTs: the read timeout of the HTTP client catches a stalled response.
    reader: AmazonS3,
    /// PUTs: no read timeout, because the response only starts once the whole body is sent,
    /// which may take longer than `timeout`; each request gets a size-based deadline instead.
    writer: AmazonS3,
    timeout: Duration,
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3")
            .field("url", &self.base_url())
            .field("timeout", &self.timeout)
            .finish()
    }
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
fn block_on<F: Future>(fut: F) -> Result<F::Output, S3Error> {
    // block_on inside a runtime panics; refusing keeps a misuse from taking the process down.
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(S3Error::Fatal(
            "the blocking S3 client was called from inside an async runtime".into(),
        ));
    }
    Ok(runtime().map_err(S3Error::Fatal)?.block_on(fut))
}

/// `fut` under a deadline; running out is worth another try. (An async fn, so that the timer
/// is created inside the runtime, as tokio requires.)
async fn deadline<T>(
    limit: Duration,
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, S3Error>>,
) -> Result<T, S3Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(S3Error::Transient(format!(
            "{}: no answer within {limit:?}",
            what()
        ))),
    }
}

impl S3 {
    /// Parses `s3://bucket[/prefix]`; credentials, region and endpoint come from the standard AWS
    /// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION /
    /// AWS_DEFAULT_REGION, AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_S3), AWS_PROFILE) and from the
    /// shared config files (~/.aws/credentials and ~/.aws/config, or AWS_SHARED_CREDENTIALS_FILE
    /// / AWS_CONFIG_FILE), profile `default` unless AWS_PROFILE. Environment wins over files.
    /// Custom endpoints use path-style addressing; an http:// endpoint is allowed. Region
    /// defaults to us-east-1. `timeout` bounds connecting and each request's idle time.
    pub fn parse(url: &str, timeout: Duration) -> Result<S3, String> {
        S3::parse_in(url, timeout, None)
    }

    /// As `parse`, with the settings taken from `env` instead of this process's environment
    /// when given (a daemon acting for a command uses the command's).
    pub fn parse_in(
        url: &str,
        timeout: Duration,
        env: Option<&[(String, String)]>,
    ) -> Result<S3, String> {
        let (bucket, prefix) = parse_url(url)?;
        if timeout.is_zero() {
            return Err(format!(
                "upstream '{url}': the timeout must be more than zero"
            ));
        }
        let own;
        let env = match env {
            Some(e) => e,
            None => {
                own = process_env();
                &own[..]
            }
        };
        let settings = Settings::resolve(env).map_err(|e| format!("upstream '{url}': {e}"))?;
        let rt = runtime().map_err(|e| format!("upstream '{url}': {e}"))?;
        // The HTTP client may look for a runtime while it is built.
        let _entered = rt.enter();
        let reader = settings
            .builder(&bucket, timeout, true)
            .build()
            .map_err(|e| format!("upstream '{url}': {}", error_text(&e)))?;
        let writer = settings
            .builder(&bucket, timeout, false)
            .build()
            .map_err(|e| format!("upstream '{url}': {}", error_text(&e)))?;
        Ok(S3 {
            bucket,
            prefix,
            reader,
            writer,
            timeout,
        })
    }

    fn base_url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The URL of `key` for log lines and error messages: s3://bucket/prefix/key.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.base_url())
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn path(&self, key: &str) -> Result<Path, S3Error> {
        // object_store would quietly drop a leading or trailing '/', naming another object.
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(S3Error::Fatal(format!(
                "{}: invalid object key '{key}'",
                self.base_url()
            )));
        }
        Path::parse(self.full_key(key))
            .map_err(|e| S3Error::Fatal(format!("{}: invalid object key: {e}", self.url_of(key))))
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
    ) -> Result<Box<dyn Read + Send>, S3Error> {
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
                    Err(S3Error::Missing)
                };
            }
            Some((start, Some(end))) => {
                return Err(S3Error::Fatal(format!(
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
    pub fn head(&self, key: &str) -> Result<bool, S3Error> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let store = self.reader.clone();
        block_on(deadline(self.request_deadline(), || url.clone(), async {
            match store.head(&path).await {
                Ok(_) => Ok(true),
                Err(e) => match classify(&url, e) {
                    S3Error::Missing => Ok(false),
                    e => Err(e),
                },
            }
        }))?
    }

    /// Object `key` whole with its ETag (the version a conditional put replaces), or None.
    pub fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, S3Error> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let store = self.writer.clone();
        let res = block_on(deadline(self.request_deadline(), || url.clone(), async {
            match store.get_opts(&path, GetOptions::new()).await {
                Ok(r) => {
                    let etag = r.meta.e_tag.clone();
                    let bytes = r.bytes().await.map_err(|e| classify(&url, e))?;
                    Ok(Some((bytes.to_vec(), etag)))
                }
                Err(e) => match classify(&url, e) {
                    S3Error::Missing => Ok(None),
                    e => Err(e),
                },
            }
        }))?;
        res
    }

    /// Stores `data` under `key` only if the object is still the version `expected` names
    /// (`None`: only if there is no object yet). False when another writer got there first.
    /// S3 evaluates the condition (`If-Match` / `If-None-Match: *`), so concurrent writers on
    /// any machine exclude each other.
    pub fn put_if(&self, key: &str, data: &[u8], expected: Option<&str>) -> Result<bool, S3Error> {
        let path = self.path(key)?;
        let url = self.url_of(key);
        let store = self.writer.clone();
        let mode = match expected {
            None => PutMode::Create,
            Some(e) => PutMode::Update(UpdateVersion {
                e_tag: Some(e.to_owned()),
                version: None,
            }),
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
    pub fn put_bytes(&self, key: &str, data: &[u8]) -> Result<(), S3Error> {
        self.put_from(key, &mut &data[..], data.len() as u64, &|e| {
            S3Error::Fatal(format!("reading the data to upload: {e}"))
        })
    }

    /// Stores the file at `path` under `key`; large files go in parts, streamed from disk.
    /// Readers see the old object or the new one, never a mix: S3 semantics give that.
    pub fn put_file(&self, key: &str, path: &FsPath) -> Result<(), S3Error> {
        let local = |e: io::Error| S3Error::Fatal(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(local)?;
        let len = file.metadata().map_err(local)?.len();
        self.put_from(key, &mut file, len, &local)
    }

    fn put_from(
        &self,
        key: &str,
        src: &mut dyn Read,
        len: u64,
        local: &dyn Fn(io::Error) -> S3Error,
    ) -> Result<(), S3Error> {
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
        local: &dyn Fn(io::Error) -> S3Error,
    ) -> Result<(), S3Error> {
        let part_size = MIN_PART.max(len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
        let rt = runtime().map_err(S3Error::Fatal)?;
        let mut in_flight = std::collections::VecDeque::new();
        let mut sent = 0u64;
        let wait = |h: tokio::task::JoinHandle<Result<(), S3Error>>| -> Result<(), S3Error> {
            match block_on(h)? {
                Ok(r) => r,
                Err(e) => Err(S3Error::Transient(format!(
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
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let full = self.full_key(prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let url = self.url_of(prefix);
        let store = self.reader.clone();
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let opts = PaginatedListOptions {
                page_token: token.take(),
                ..Default::default()
            };
            let page = block_on(deadline(self.request_deadline(), || url.clone(), async {
                store
                    .list_paginated(Some(&full), opts)
                    .await
                    .map_err(|e| classify(&url, e))
            }))?;
            let page = match page {
                Ok(p) => p,
                // A LIST answers 404 only when the bucket itself is missing.
                Err(S3Error::Missing) => {
                    return Err(S3Error::Fatal(format!(
                        "{url}: bucket '{}' does not exist",
                        self.bucket
                    )))
                }
                Err(e) => return Err(e),
            };
            keys.extend(
                page.result
                    .objects
                    .iter()
                    .filter_map(|o| o.location.as_ref().strip_prefix(&strip).map(String::from)),
            );
            match page.page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(keys)
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
                        S3Error::Missing => return Err(io::ErrorKind::NotFound.into()),
                        S3Error::Transient(m) => (io::ErrorKind::Other, m),
                        S3Error::Fatal(m) => (io::ErrorKind::InvalidData, m),
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

/// This process's environment, as far as it is text.
fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// The variables of this process's environment that S3 settings are read from: what a
/// command hands to the daemon acting for it.
pub fn settings_env() -> Vec<(String, String)> {
    process_env()
        .into_iter()
        .filter(|(k, _)| k.starts_with("AWS_") || k == "HOME")
        .collect()
}

/// `s3://bucket[/prefix]` → (bucket, prefix without surrounding '/').
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("upstream '{url}': expected s3://bucket[/prefix]"))?;
    if rest.contains(['?', '#']) {
        return Err(format!(
            "upstream '{url}': query strings and fragments are not part of an s3:// URL"
        ));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "upstream '{url}': no bucket name (expected s3://bucket[/prefix])"
        ));
    }
    // Broader than AWS's rules (MinIO and Ceph accept some names AWS refuses), but nothing
    // that could change the meaning of a request URL.
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "upstream '{url}': '{bucket}' is not a valid bucket name"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() && Path::parse(prefix).is_err() {
        return Err(format!(
            "upstream '{url}': invalid prefix '{prefix}' (empty, '.' or '..' segments, or control characters)"
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// Static credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Creds {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// What the environment and the shared files say, resolved with the AWS precedence.
#[derive(Debug)]
struct Settings {
    /// None: left to object_store (web identity, container or instance credentials).
    creds: Option<Creds>,
    region: String,
    endpoint: Option<String>,
    /// Other AWS_* variables object_store understands (proxies, checksums, web identity...).
    passthrough: Vec<(AmazonS3ConfigKey, String)>,
}

impl Settings {
    fn resolve(env: &[(String, String)]) -> Result<Settings, String> {
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let home = var("HOME").map(PathBuf::from);
        let expand = |p: String| match (p.strip_prefix("~/"), &home) {
            (Some(rest), Some(h)) => h.join(rest),
            _ => PathBuf::from(p),
        };
        let default_path = |name: &str| home.as_ref().map(|h| h.join(".aws").join(name));
        let config_path = var("AWS_CONFIG_FILE")
            .map(expand)
            .or_else(|| default_path("config"));
        let creds_path = var("AWS_SHARED_CREDENTIALS_FILE")
            .map(expand)
            .or_else(|| default_path("credentials"));
        let config = match &config_path {
            Some(p) => read_ini(p)?,
            None => HashMap::new(),
        };
        let creds_file = match &creds_path {
            Some(p) => read_ini(p)?,
            None => HashMap::new(),
        };
        let chosen = var("AWS_PROFILE");
        let profile_name = chosen.clone().unwrap_or_else(|| "default".to_owned());
        let from_config = config_profile(&config, &profile_name);
        let from_creds = creds_file.get(&profile_name);
        if chosen.is_some() && from_config.is_none() && from_creds.is_none() {
            let show = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map_or("(no HOME)".to_owned(), |p| p.display().to_string())
            };
            return Err(format!(
                "AWS_PROFILE={profile_name}: no such profile in {} or {}",
                show(&config_path),
                show(&creds_path)
            ));
        }
        let prof = |k: &str| {
            from_creds
                .and_then(|p| p.get(k))
                .or_else(|| from_config.and_then(|p| p.get(k)))
                .filter(|v| !v.is_empty())
                .cloned()
        };

        let creds = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key_id), Some(secret)) => Some(Creds {
                key_id,
                secret,
                token: var("AWS_SESSION_TOKEN"),
            }),
            (Some(_), None) => {
                return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
            }
            (None, Some(_)) => {
                return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
            }
            (None, None) => match (prof("aws_access_key_id"), prof("aws_secret_access_key")) {
                (Some(key_id), Some(secret)) => Some(Creds {
                    key_id,
                    secret,
                    token: prof("aws_session_token"),
                }),
                (None, None) => None,
                _ => {
                    return Err(format!(
                        "profile '{profile_name}' has only one of aws_access_key_id and aws_secret_access_key"
                    ))
                }
            },
        };

        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| prof("region"))
            .unwrap_or_else(|| "us-east-1".to_owned());

        let ignore_endpoints = var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint = if ignore_endpoints {
            None
        } else {
            var("AWS_ENDPOINT_URL_S3")
                .or_else(|| var("AWS_ENDPOINT_URL"))
                .or_else(|| var("AWS_ENDPOINT"))
                .or_else(|| prof("s3.endpoint_url"))
                .or_else(|| prof("endpoint_url"))
        };
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("endpoint '{e}' is not an http:// or https:// URL"));
            }
        }

        let mut passthrough = Vec::new();
        for (name, value) in env {
            if !name.starts_with("AWS_") || value.is_empty() {
                continue;
            }
            let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else {
                continue;
            };
            // Resolved above (with the files), or ours to decide.
            let ours = matches!(
                key,
                AmazonS3ConfigKey::AccessKeyId
                    | AmazonS3ConfigKey::SecretAccessKey
                    | AmazonS3ConfigKey::Token
                    | AmazonS3ConfigKey::Region
                    | AmazonS3ConfigKey::DefaultRegion
                    | AmazonS3ConfigKey::Endpoint
                    | AmazonS3ConfigKey::S3Endpoint
                    | AmazonS3ConfigKey::Bucket
                    | AmazonS3ConfigKey::Client(
                        ClientConfigKey::Timeout
                            | ClientConfigKey::ConnectTimeout
                            | ClientConfigKey::ReadTimeout
                    )
            );
            if !ours {
                passthrough.push((key, value.clone()));
            }
        }

        Ok(Settings {
            creds,
            region,
            endpoint,
            passthrough,
        })
    }

    fn builder(&self, bucket: &str, timeout: Duration, reader: bool) -> AmazonS3Builder {
        let mut opts = ClientOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout_disabled();
        if reader {
            opts = opts.with_read_timeout(timeout);
        }
        // object_store retries 5xx, SlowDown and network errors itself; keep that short so
        // that the caller's own retries and failover to another upstream stay in charge.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: timeout.clamp(Duration::from_millis(100), Duration::from_secs(2)),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: timeout,
        };
        let mut b = AmazonS3Builder::new()
            .with_client_options(opts)
            .with_retry(retry);
        // After the client options: these adjust them rather than replace them.
        for (key, value) in &self.passthrough {
            b = b.with_config(*key, value);
        }
        b = b.with_bucket_name(bucket).with_region(&self.region);
        if let Some(c) = &self.creds {
            b = b
                .with_access_key_id(&c.key_id)
                .with_secret_access_key(&c.secret);
            if let Some(t) = &c.token {
                b = b.with_token(t);
            }
        }
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.trim_end_matches('/'));
            if e.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
        b
    }
}

/// The `[profile name]` section of a config file (`[default]` for the default profile).
fn config_profile<'a>(
    config: &'a HashMap<String, HashMap<String, String>>,
    name: &str,
) -> Option<&'a HashMap<String, String>> {
    config.get(&format!("profile {name}")).or_else(|| {
        if name == "default" {
            config.get("default")
        } else {
            None
        }
    })
}

/// A shared config or credentials file; a missing file is an empty one.
fn read_ini(path: &FsPath) -> Result<HashMap<String, HashMap<String, String>>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_ini(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// The AWS flavour of INI: `[section]` headers (section names with inner whitespace
/// collapsed, so `[profile  x]` is `profile x`), `key = value` lines, whole-line comments with
/// `#` or `;` and trailing ones after whitespace, and indented sub-properties under a key with
/// an empty value (`s3 =` then `  endpoint_url = ...`), stored as `s3.endpoint_url`.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section: Option<String> = None;
    let mut parent: Option<String> = None;
    for raw in text.lines() {
        let indented = raw.starts_with([' ', '\t']);
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if !indented && line.starts_with('[') {
            section = line
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "));
            parent = None;
            continue;
        }
        let Some(sec) = &section else { continue };
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
        let props = out.entry(sec.clone()).or_default();
        if indented {
            if let Some(p) = &parent {
                props.insert(format!("{p}.{k}"), v);
            }
            continue;
        }
        parent = v.is_empty().then(|| k.clone());
        props.insert(k, v);
    }
    out
}

fn strip_comment(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with(['#', ';']) {
        return "";
    }
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if (b == b'#' || b == b';') && i > 0 && bytes[i - 1].is_ascii_whitespace() {
            return &line[..i];
        }
    }
    line
}

/// An error's message with its causes, each once.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
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

/// `text` with an S3 XML error document shortened to its code and message (request ids and
/// the XML itself only make log lines longer).
fn shorten_xml(text: &str) -> String {
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
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// A write has no object to miss: a 404 means the bucket (or the multipart upload) is gone.
fn classify_write(url: &str, e: object_store::Error) -> S3Error {
    let msg = shorten_xml(&format!("{url}: {}", error_text(&e)));
    match classify(url, e) {
        S3Error::Missing => S3Error::Fatal(msg),
        other => other,
    }
}

fn classify(url: &str, e: object_store::Error) -> S3Error {
    use object_store::Error as E;
    let msg = shorten_xml(&format!("{url}: {}", error_text(&e)));
    match &e {
        E::NotFound { .. } if msg.contains("NoSuchBucket") => S3Error::Fatal(msg),
        E::NotFound { .. } => S3Error::Missing,
        E::Generic { .. } | E::JoinError { .. } => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = cur {
                // Connection refused or reset, timeouts, bodies cut short: all worth another try.
                if s.downcast_ref::<object_store::client::HttpError>()
                    .is_some()
                    || s.downcast_ref::<io::Error>().is_some()
                {
                    return S3Error::Transient(msg);
                }
                cur = s.source();
            }
            match status_in(&msg) {
                Some(404) if msg.contains("NoSuchBucket") => S3Error::Fatal(msg),
                Some(404) => S3Error::Missing,
                Some(408 | 429) => S3Error::Transient(msg),
                Some(s) if s >= 500 => S3Error::Transient(msg),
                // S3's answer to a client that sent its body too slowly.
                Some(400) if msg.contains("RequestTimeout") => S3Error::Transient(msg),
                Some(_) => S3Error::Fatal(msg),
                // A 200 whose body is an error (InternalError, SlowDown).
                None if msg.contains("Server returned error response") => S3Error::Transient(msg),
                None if matches!(e, E::JoinError { .. }) => S3Error::Transient(msg),
                None => S3Error::Fatal(msg),
            }
        }
        _ => S3Error::Fatal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ini_sections_comments_and_subproperties() {
        let text = "\
# a comment
[default]
region = eu-west-1   # trailing comment
aws_access_key_id=AKIA1
; another comment

[profile  dev ]
endpoint_url = http://localhost:9000
s3 =
  endpoint_url = http://localhost:9001
  addressing_style = path
region = us-west-2
[dev]
aws_secret_access_key = se#cret
junk line without equals
";
        let ini = parse_ini(text);
        let d = &ini["default"];
        assert_eq!(d["region"], "eu-west-1");
        assert_eq!(d["aws_access_key_id"], "AKIA1");
        let p = &ini["profile dev"];
        assert_eq!(p["endpoint_url"], "http://localhost:9000");
        assert_eq!(p["s3.endpoint_url"], "http://localhost:9001");
        assert_eq!(p["s3.addressing_style"], "path");
        assert_eq!(p["region"], "us-west-2");
        assert!(!p.contains_key("addressing_style"));
        // '#' inside a value (not after whitespace) is part of it.
        assert_eq!(ini["dev"]["aws_secret_access_key"], "se#cret");
        assert_eq!(ini.len(), 3);
    }

    #[test]
    fn ini_ignores_lines_before_any_section() {
        let ini = parse_ini("region = x\n[default]\nregion = y\n");
        assert_eq!(ini.len(), 1);
        assert_eq!(ini["default"]["region"], "y");
    }

    #[test]
    fn profile_files_and_environment_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        let creds = dir.path().join("credentials");
        std::fs::write(
            &config,
            "[default]\nregion = eu-central-1\n[profile work]\nregion = ap-south-1\n\
             endpoint_url = http://127.0.0.1:9\naws_access_key_id = CFGKEY\n\
             aws_secret_access_key = CFGSECRET\n",
        )
        .unwrap();
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = DEFSECRET\n\
             [work]\naws_access_key_id = WORKKEY\naws_secret_access_key = WORKSECRET\n\
             aws_session_token = WORKTOKEN\n",
        )
        .unwrap();
        let files = [
            ("AWS_CONFIG_FILE", config.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("HOME", "/nonexistent"),
        ];

        // Default profile from the files.
        let s = Settings::resolve(&env(&files)).unwrap();
        assert_eq!(s.region, "eu-central-1");
        assert_eq!(s.creds.as_ref().unwrap().key_id, "DEFKEY");
        assert_eq!(s.endpoint, None);

        // A named profile: the credentials file wins over the config file.
        let mut e = env(&files);
        e.push(("AWS_PROFILE".into(), "work".into()));
        let s = Settings::resolve(&e).unwrap();
        assert_eq!(s.region, "ap-south-1");
        assert_eq!(
            s.creds,
            Some(Creds {
                key_id: "WORKKEY".into(),
                secret: "WORKSECRET".into(),
                token: Some("WORKTOKEN".into()),
            })
        );
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9"));

        // The environment wins over every file.
        e.extend(env(&[
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "ENVSECRET"),
            ("AWS_DEFAULT_REGION", "sa-east-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:10"),
        ]));
        let s = Settings::resolve(&e).unwrap();
        assert_eq!(
            s.creds,
            Some(Creds {
                key_id: "ENVKEY".into(),
                secret: "ENVSECRET".into(),
                token: None,
            })
        );
        assert_eq!(s.region, "sa-east-1");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:10"));
        e.push(("AWS_REGION".into(), "us-west-1".into()));
        e.push(("AWS_ENDPOINT_URL_S3".into(), "https://s3.example".into()));
        let s = Settings::resolve(&e).unwrap();
        assert_eq!(s.region, "us-west-1");
        assert_eq!(s.endpoint.as_deref(), Some("https://s3.example"));
        assert!(s.passthrough.is_empty(), "{:?}", s.passthrough);
    }

    #[test]
    fn missing_profile_and_half_credentials_are_errors() {
        let e = env(&[("HOME", "/nonexistent"), ("AWS_PROFILE", "nope")]);
        let err = Settings::resolve(&e).unwrap_err();
        assert!(err.contains("AWS_PROFILE=nope"), "{err}");
        let e = env(&[("HOME", "/nonexistent"), ("AWS_ACCESS_KEY_ID", "k")]);
        let err = Settings::resolve(&e).unwrap_err();
        assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
        let e = env(&[
            ("HOME", "/nonexistent"),
            ("AWS_ENDPOINT_URL", "localhost:9000"),
        ]);
        let err = Settings::resolve(&e).unwrap_err();
        assert!(err.contains("localhost:9000"), "{err}");
    }

    #[test]
    fn nothing_configured_gives_defaults() {
        let s = Settings::resolve(&env(&[("HOME", "/nonexistent")])).unwrap();
        assert_eq!(s.region, "us-east-1");
        assert_eq!(s.creds, None);
        assert_eq!(s.endpoint, None);
    }

    #[test]
    fn other_aws_variables_pass_through() {
        let s = Settings::resolve(&env(&[
            ("HOME", "/nonexistent"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_TIMEOUT", "1s"),
            ("AWS_PROFILE_UNKNOWN_THING", "x"),
            ("AWS_SESSION_TOKEN", "orphan"),
        ]))
        .unwrap();
        let keys: Vec<_> = s.passthrough.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec![AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)]
        );
        // A session token without keys is not used.
        assert_eq!(s.creds, None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://b").unwrap(),
            ("b".to_owned(), String::new())
        );
        assert_eq!(
            parse_url("s3://b/p/q/").unwrap(),
            ("b".to_owned(), "p/q".to_owned())
        );
        for bad in [
            "s3://",
            "s3:///x",
            "http://b",
            "s3://b/a//c",
            "s3://b/..",
            "s3://b c",
            "s3://b?x=1",
        ] {
            let err = parse_url(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn statuses_and_messages() {
        assert_eq!(
            status_in("Error performing PUT x in 1s - Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>"),
            Some(503)
        );
        assert_eq!(status_in("no status here"), None);
        assert_eq!(status_in("status code: 4"), None);
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(io::Error::other("inner"));
        assert_eq!(error_text(&e), "outer: inner");
        assert_eq!(
            shorten_xml(
                "x: 404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code>\
                 <Message>The specified bucket does not exist</Message><RequestId>1</RequestId>\
                 </Error> tail"
            ),
            "x: 404 Not Found: NoSuchBucket (The specified bucket does not exist) tail"
        );
        assert_eq!(shorten_xml("plain"), "plain");
        assert_eq!(shorten_xml("<Error>broken"), "<Error>broken");
    }
}
