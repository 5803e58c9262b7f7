//! `kcache serve`: read-only HTTP for a store's blobs and snapshots, in the remote layout
//! (see the README), so peers on a LAN can use each other as upstreams. `GET /tags/<volume>`
//! snapshots that volume at that moment; blobs support HEAD and single byte ranges, and
//! `GET /outboards/..` computes a local blob's outboard (kept for the next asker), so peers can
//! read large files while they download.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use kcache_store::{Hash, OpenOptionsStore, Store};
use lru::LruCache;
use tiny_http::{Header, Method, Response, StatusCode};

pub fn serve(store_dir: &Path, listen: &str) -> Result<ExitCode> {
    let store = Store::open_with(store_dir, &OpenOptionsStore { read_only: true })
        .with_context(|| format!("opening store {}", store_dir.display()))?;
    let server =
        tiny_http::Server::http(listen).map_err(|e| anyhow!("listening on {listen}: {e}"))?;
    eprintln!(
        "kcache: serving {} on http://{} (read-only)",
        store_dir.display(),
        server.server_addr()
    );
    let store = Arc::new(store);
    let caches = Arc::new(Caches {
        manifests: Mutex::new(LruCache::new(
            NonZeroUsize::new(MANIFESTS).expect("not zero"),
        )),
        outboards: Mutex::new(LruCache::new(
            NonZeroUsize::new(OUTBOARDS).expect("not zero"),
        )),
    });
    let server = Arc::new(server);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (server, store, caches) = (server.clone(), store.clone(), caches.clone());
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    answer(&store, &caches, req);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(ExitCode::SUCCESS)
}

fn text(status: u16, body: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body).with_status_code(StatusCode(status))
}

/// Manifests a peer may still ask for, and outboards already computed: both bounded, so a
/// long-running server's memory stays put.
const MANIFESTS: usize = 16;
const OUTBOARDS: usize = 1024;

struct Caches {
    /// Made for GET /tags/<volume>, by hash, for the GET of the manifest that follows.
    manifests: Mutex<LruCache<String, Arc<Vec<u8>>>>,
    /// Computed on demand (32 bytes per MiB of blob).
    outboards: Mutex<LruCache<Hash, Arc<Vec<u8>>>>,
}

fn answer(store: &Store, caches: &Caches, req: tiny_http::Request) {
    if !matches!(req.method(), Method::Get | Method::Head) {
        let _ = req.respond(text(405, "read-only\n"));
        return;
    }
    let url = req.url().split('?').next().unwrap_or("").to_owned();
    let parts: Vec<&str> = url.trim_start_matches('/').split('/').collect();
    let res = match parts.as_slice() {
        ["blobs", _, hex] => match Hash::from_hex(hex) {
            Some(h) => return blob(store, &h, req),
            None => text(404, "no such blob\n"),
        },
        ["outboards", _, hex] => match Hash::from_hex(hex) {
            Some(h) => match outboard(store, &caches.outboards, &h) {
                Some(b) => Response::from_data(b.to_vec()).with_status_code(StatusCode(200)),
                None => text(404, "no outboard here\n"),
            },
            None => text(404, "no such outboard\n"),
        },
        ["manifests", hex] => match lock(&caches.manifests).get(*hex).cloned() {
            Some(b) => Response::from_data(b.to_vec()).with_status_code(StatusCode(200)),
            None => text(404, "no such manifest\n"),
        },
        ["tags", volume] => match store.snapshot_bytes(volume) {
            Ok((hash, bytes)) => {
                lock(&caches.manifests).put(hash.clone(), Arc::new(bytes));
                text(200, &format!("{hash}\n"))
            }
            Err(kcache_store::Error::NoVolume(_)) => text(404, "no such volume\n"),
            Err(e) => text(500, &format!("{e}\n")),
        },
        _ => text(404, "not found\n"),
    };
    let _ = req.respond(res);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The outboard of local blob `h` (if it is big enough to have one), from `cache` or computed.
fn outboard(
    store: &Store,
    cache: &Mutex<LruCache<Hash, Arc<Vec<u8>>>>,
    h: &Hash,
) -> Option<Arc<Vec<u8>>> {
    if let Some(b) = lock(cache).get(h) {
        return Some(b.clone());
    }
    let mut file = store.blobs().open_blob(h).ok()?;
    let size = file.metadata().ok()?.len();
    if !kcache_store::outboard::needed(size) {
        return None;
    }
    let b = Arc::new(kcache_store::outboard::compute(&mut file, size).ok()?);
    lock(cache).put(*h, b.clone());
    Some(b)
}

/// A local blob, whole or one byte range.
fn blob(store: &Store, h: &Hash, req: tiny_http::Request) {
    let mut file: File = match store.blobs().open_blob(h) {
        Ok(f) => f,
        Err(_) => {
            let _ = req.respond(text(404, "not here\n"));
            return;
        }
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .and_then(|h| parse_range(h.value.as_str(), len));
    let header =
        |k: &str, v: String| Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("valid header");
    let mut headers = vec![header("Accept-Ranges", "bytes".into())];
    let (status, start, count) = match range {
        Some(Ok((a, b))) => {
            headers.push(header("Content-Range", format!("bytes {a}-{b}/{len}")));
            (206, a, b - a + 1)
        }
        Some(Err(())) => {
            headers.push(header("Content-Range", format!("bytes */{len}")));
            let _ = req.respond(text(416, "range not satisfiable\n"));
            return;
        }
        None => (200, 0, len),
    };
    if file.seek(SeekFrom::Start(start)).is_err() {
        let _ = req.respond(text(500, "seek failed\n"));
        return;
    }
    let body = std::io::Read::take(file, count);
    let resp = Response::new(
        StatusCode(status),
        headers,
        body,
        Some(count as usize),
        None,
    );
    let _ = req.respond(resp);
}

/// "bytes=a-b", "bytes=a-", "bytes=-n" (one range). `None`: no usable Range header (serve
/// everything); `Some(Err)`: unsatisfiable.
fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.saturating_sub(1)),
        ),
    };
    if start > end || start >= len {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Some(Ok((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("items=1-2", 100), None);
    }
}
