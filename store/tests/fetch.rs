//! Fetching remote-only blobs at the store level, over a `file://` upstream: no mount, no
//! server, so the orderings that are races in a daemon can be set up on purpose.

use std::sync::Arc;

mod common;

use common::{commit, node};
use kcache_store::{FetchConfig, Kind, Remote, Store, Upstream};

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
}

/// Store A with one file, pushed to a shared directory; store B pulled from it (the blob is
/// remote-only there). Returns B, the blob's hash, the upstream URL and the content.
fn pulled(dir: &std::path::Path, len: usize) -> (Arc<Store>, kcache_store::Hash, String, Vec<u8>) {
    pulled_with(dir, content(len))
}

fn pulled_with(
    dir: &std::path::Path,
    data: Vec<u8>,
) -> (Arc<Store>, kcache_store::Hash, String, Vec<u8>) {
    let a = Store::open(&dir.join("a")).unwrap();
    let vol = a.volume("default", true, 0, 0).unwrap();
    let f = a.create(vol.root, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, &data);
    let url = format!("file://{}", dir.join("up").display());
    let up = Upstream::parse(&url).unwrap();
    a.push(&up, "default", "default", None, &mut |_| {})
        .unwrap();
    let b = Arc::new(Store::open(&dir.join("b")).unwrap());
    let remote = Remote::new(vec![up], FetchConfig::default()).unwrap();
    b.pull(&remote, "default", "default", &[]).unwrap();
    let vb = b.volume("default", false, 0, 0).unwrap();
    let h = b.lookup(vb.root, b"f").unwrap().blob.unwrap();
    assert!(b.is_remote_only(&h));
    (b, h, url, data)
}

fn set_upstream(store: &Store, url: &str) {
    let up = Upstream::parse(url).unwrap();
    store.set_remote(Remote::new(vec![up], FetchConfig::default()).unwrap());
}

fn staging_files(store_dir: &std::path::Path) -> usize {
    std::fs::read_dir(store_dir.join("staging"))
        .unwrap()
        .count()
}

/// A static HTTP server over `root` on loopback that sends bodies slowly (`per_chunk`
/// between 16 KiB chunks), so a download through it is still going while another finishes.
fn slow_server(root: std::path::PathBuf, per_chunk: std::time::Duration) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let Ok(body) = std::fs::read(root.join(path.trim_start_matches('/'))) else {
                    let _ = conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                for chunk in body.chunks(16 << 10) {
                    std::thread::sleep(per_chunk);
                    if conn.write_all(chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// Two downloads of one blob that do not know of each other (the upstreams were set again
/// between the two opens, as a mount with its own `upstream=` does): the slow one finishes
/// after the fast one made the blob local, and must leave that blob file alone rather than
/// rename over it (and then remove it, leaving the index pointing at nothing).
#[test]
fn a_second_download_of_a_blob_made_local_meanwhile_keeps_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (b, h, url, data) = pulled(dir.path(), 200_000);
    let slow = slow_server(dir.path().join("up"), std::time::Duration::from_millis(40));
    set_upstream(&b, &slow);
    let first = b
        .fetch(&h)
        .unwrap()
        .expect("remote-only: a download starts");
    set_upstream(&b, &url);
    let second = b
        .fetch(&h)
        .unwrap()
        .expect("a download the new upstreams know nothing of");
    second.wait(&|| true).unwrap();
    assert!(
        !first.is_done(),
        "the slow download ended first; the test proves nothing"
    );
    first.wait(&|| true).unwrap();
    assert!(!b.is_remote_only(&h));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut b.open_blob(&h).unwrap(), &mut got).unwrap();
    assert!(got == data, "the local blob is not the content");
    drop((first, second));
    assert_eq!(staging_files(&dir.path().join("b")), 0);
}

/// A download whose last reader leaves once every byte is there is kept all the same.
#[test]
fn a_complete_download_is_kept_when_its_reader_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (b, h, url, data) = pulled(dir.path(), 5 << 20);
    set_upstream(&b, &url);
    let lease = b.fetch(&h).unwrap().unwrap();
    assert!(lease.streamable(), "a 5 MiB blob has an outboard");
    // Read it all through the lease, then let go at once.
    let mut got = vec![0u8; data.len()];
    let mut off = 0;
    while off < got.len() {
        off += lease.read_at(&mut got[off..], off as u64).unwrap();
    }
    assert!(got == data);
    drop(lease);
    assert_eq!(b.drain_fetches(std::time::Duration::from_secs(30)), 0);
    assert!(!b.is_remote_only(&h), "the whole download was thrown away");
    assert_eq!(staging_files(&dir.path().join("b")), 0);
}

/// A download leaves the blob's aligned 4 KiB blocks of zeros as holes (both with an
/// outboard, group by group, and verified whole), records the allocation, and the bytes
/// are the same.
#[test]
fn a_downloaded_blob_keeps_its_blocks_of_zeros_as_holes() {
    use std::os::unix::fs::MetadataExt;
    for (len, zeros) in [
        (5usize << 20, (1 << 20) + 100..(4 << 20) + 7),
        (600 << 10, 5000..590 << 10),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut data = content(len);
        data[zeros.clone()].fill(0);
        let (b, h, url, data) = pulled_with(dir.path(), data);
        set_upstream(&b, &url);
        assert!(b.ensure_local(&h, &|| true).unwrap());
        let meta = std::fs::metadata(b.blob_path(&h)).unwrap();
        let data_blocks = (len - zeros.len()) as u64 / 512;
        assert!(
            meta.blocks() <= data_blocks + 64,
            "{len}: {} blocks on disk for {data_blocks} blocks of data",
            meta.blocks()
        );
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut b.open_blob(&h).unwrap(), &mut got).unwrap();
        assert!(got == data, "{len}: content differs");
        let vb = b.volume("default", false, 0, 0).unwrap();
        let f = b.lookup(vb.root, b"f").unwrap();
        assert_eq!(f.blob_blocks, Some(meta.blocks()));
    }
}
