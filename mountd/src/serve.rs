//! `kcache serve`: read-only HTTP for a store's blobs and snapshots, in the remote layout
//! (see the README), so peers on a LAN can use each other as upstreams. `GET /tags/<volume>`
//! snapshots that volume at that moment; blobs support HEAD and single byte ranges, and
//! `GET /outboards/..` computes a local blob's outboard (kept for the next asker), so peers can
//! read large files while they download.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use kcache_store::{Hash, OpenOptionsStore, Store};
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
    // Manifests made for GET /tags/<volume>, by hash, for the GET that follows; outboards
    // computed on demand.
    let manifests: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let server = Arc::new(server);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (server, store, manifests) = (server.clone(), store.clone(), manifests.clone());
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    answer(&store, &manifests, req);
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

fn answer(store: &Store, manifests: &Mutex<HashMap<String, Vec<u8>>>, req: tiny_http::Request) {
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
            Some(h) => match outboard(store, manifests, &h) {
                Some(b) => Response::from_data(b).with_status_code(StatusCode(200)),
                None => text(404, "no outboard here\n"),
            },
            None => text(404, "no such outboard\n"),
        },
        ["manifests", hex] => match manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(*hex)
        {
            Some(b) => Response::from_data(b.clone()).with_status_code(StatusCode(200)),
            None => text(404, "no such manifest\n"),
        },
        ["tags", volume] => match store.snapshot_bytes(volume) {
            Ok((hash, bytes)) => {
                manifests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(hash.clone(), bytes);
                text(200, &format!("{hash}\n"))
            }
            Err(kcache_store::Error::NoVolume(_)) => text(404, "no such volume\n"),
            Err(e) => text(500, &format!("{e}\n")),
        },
        _ => text(404, "not found\n"),
    };
    let _ = req.respond(res);
}

/// The outboard of local blob `h` (if it is big enough to have one), from `cache` or computed.
/// Outboards share the manifests' map under an "outboard:" key; at most `CACHED` are kept.
fn outboard(store: &Store, cache: &Mutex<HashMap<String, Vec<u8>>>, h: &Hash) -> Option<Vec<u8>> {
    const CACHED: usize = 256;
    let key = format!("outboard:{h}");
    if let Some(b) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Some(b.clone());
    }
    let mut file = store.open_blob(h).ok()?;
    let size = file.metadata().ok()?.len();
    if !kcache_store::outboard::needed(size) {
        return None;
    }
    let b = kcache_store::outboard::compute(&mut file, size).ok()?;
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() >= CACHED {
        let old: Vec<String> = c
            .keys()
            .filter(|k| k.starts_with("outboard:"))
            .cloned()
            .collect();
        for k in old {
            c.remove(&k);
        }
    }
    c.insert(key, b.clone());
    Some(b)
}

/// A local blob, whole or one byte range.
fn blob(store: &Store, h: &Hash, req: tiny_http::Request) {
    let mut file: File = match store.open_blob(h) {
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
