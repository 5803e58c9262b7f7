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
    let f = a.ns().create(vol.root, b"f", &node(Kind::File)).unwrap();
    commit(&a, f.ino, &data);
    let url = format!("file://{}", dir.join("up").display());
    let up = Upstream::parse(&url).unwrap();
    a.push(&up, "default", "default", None, &mut |_| {})
        .unwrap();
    let b = Arc::new(Store::open(&dir.join("b")).unwrap());
    let remote = Remote::new(vec![up], FetchConfig::default()).unwrap();
    b.pull(&remote, "default", "default", &[]).unwrap();
    let vb = b.volume("default", false, 0, 0).unwrap();
    let h = b.ns().lookup(vb.root, b"f").unwrap().blob.unwrap();
    assert!(b.is_remote_only(&h));
    (b, h, url, data)
}

/// Where a fetch comes from: the one upstream at `url`.
fn remote(url: &str) -> Arc<Remote> {
    let up = Upstream::parse(url).unwrap();
    Arc::new(Remote::new(vec![up], FetchConfig::default()).unwrap())
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

/// A download that finishes after a write of the same bytes made the blob local meanwhile
/// must leave that blob file alone rather than rename over it (and then remove it, leaving
/// the index pointing at nothing). (Two downloads of one blob can no longer both be in
/// flight: every request joins the store's one download, whatever its upstreams; a write
/// is the way left to make the blob local under a download.)
#[test]
fn a_download_finishing_after_a_write_made_the_blob_local_keeps_the_written_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (b, h, _url, data) = pulled(dir.path(), 200_000);
    let slow = slow_server(dir.path().join("up"), std::time::Duration::from_millis(40));
    let first = b
        .fetch(&h, &remote(&slow))
        .unwrap()
        .expect("remote-only: a download starts");
    // The same bytes written to another file: the blob becomes local from the write.
    let vb = b.volume("default", false, 0, 0).unwrap();
    let g = b.ns().create(vb.root, b"g", &node(Kind::File)).unwrap();
    commit(&b, g.ino, &data);
    assert!(!b.is_remote_only(&h));
    let written = std::fs::metadata(b.blobs().blob_path(&h)).unwrap().ino();
    assert!(
        !first.is_done(),
        "the slow download ended first; the test proves nothing"
    );
    first.wait(&|| true).unwrap();
    assert_eq!(
        std::fs::metadata(b.blobs().blob_path(&h)).unwrap().ino(),
        written,
        "the download replaced the written blob file"
    );
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut b.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
    assert!(got == data, "the local blob is not the content");
    drop(first);
    assert_eq!(staging_files(&dir.path().join("b")), 0);
}

/// Copies an upstream directory (blobs, outboards, manifests, tags).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn upstream_blob(up: &std::path::Path, h: &kcache_store::Hash) -> std::path::PathBuf {
    let hex = h.to_hex();
    up.join("blobs").join(&hex[..2]).join(hex)
}

/// Two upstream lists (two mounts' `upstream=`) over one store: each fetch comes from the
/// upstreams it names, not from whichever were set last. Blob p is only on upstream A, q
/// only on B.
#[test]
fn each_fetch_comes_from_the_upstreams_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("a")).unwrap();
    let vol = a.volume("default", true, 0, 0).unwrap();
    let (p_data, q_data) = (content(300_000), content(300_001));
    for (name, data) in [(&b"p"[..], &p_data), (b"q", &q_data)] {
        let f = a.ns().create(vol.root, name, &node(Kind::File)).unwrap();
        commit(&a, f.ino, data);
    }
    let (up_a, up_b) = (dir.path().join("up-a"), dir.path().join("up-b"));
    let url_a = format!("file://{}", up_a.display());
    let url_b = format!("file://{}", up_b.display());
    a.push(
        &Upstream::parse(&url_a).unwrap(),
        "default",
        "default",
        None,
        &mut |_| {},
    )
    .unwrap();
    copy_dir(&up_a, &up_b);
    let b = Arc::new(Store::open(&dir.path().join("b")).unwrap());
    b.pull(&remote(&url_a), "default", "default", &[]).unwrap();
    let vb = b.volume("default", false, 0, 0).unwrap();
    let p = b.ns().lookup(vb.root, b"p").unwrap().blob.unwrap();
    let q = b.ns().lookup(vb.root, b"q").unwrap().blob.unwrap();
    std::fs::remove_file(upstream_blob(&up_a, &q)).unwrap();
    std::fs::remove_file(upstream_blob(&up_b, &p)).unwrap();
    let (ra, rb) = (remote(&url_a), remote(&url_b));

    let e = b.ensure_local(&q, &ra, &|| true).unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    let e = b.ensure_local(&p, &rb, &|| true).unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    assert!(b.is_remote_only(&p) && b.is_remote_only(&q));
    assert!(b.ensure_local(&p, &ra, &|| true).unwrap());
    assert!(b.ensure_local(&q, &rb, &|| true).unwrap());
    for (h, want) in [(p, &p_data), (q, &q_data)] {
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut b.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
        assert!(&got == want);
    }
    assert_eq!(staging_files(&dir.path().join("b")), 0);
}

/// A download started from one mount's upstreams is joined by a request naming other
/// upstreams (which do not even have the blob: a download of its own would fail), is read
/// through that second lease to the end, and once every lease is gone the shutdown drain
/// waits for it to be kept.
#[test]
fn a_download_is_joined_whatever_upstreams_the_second_request_names_and_drained() {
    let dir = tempfile::tempdir().unwrap();
    let (b, h, _url, data) = pulled(dir.path(), 5 << 20);
    let slow = slow_server(dir.path().join("up"), std::time::Duration::from_millis(2));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let first = b.fetch(&h, &remote(&slow)).unwrap().unwrap();
    assert!(b.is_fetching(&h));
    let second = b
        .fetch(&h, &remote(&format!("file://{}", empty.display())))
        .unwrap()
        .unwrap();
    assert_eq!(
        staging_files(&dir.path().join("b")),
        1,
        "two downloads of one blob"
    );
    assert!(
        !first.is_done(),
        "the download ended before the second request; the test proves nothing"
    );
    // The first caller goes away; the download goes on for the second.
    drop(first);
    assert!(second.streamable(), "a 5 MiB blob has an outboard");
    let mut got = vec![0u8; data.len()];
    let mut off = 0;
    while off < got.len() {
        off += second.read_at(&mut got[off..], off as u64).unwrap();
    }
    assert!(got == data, "read through the joined lease: wrong bytes");
    drop(second);
    assert_eq!(b.drain_fetches(std::time::Duration::from_secs(30)), 0);
    assert!(
        !b.is_remote_only(&h),
        "the drain did not wait for the download"
    );
    assert!(!b.is_fetching(&h));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut b.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
    assert!(got == data);
    assert_eq!(staging_files(&dir.path().join("b")), 0);
}

/// A download whose last reader leaves once every byte is there is kept all the same.
#[test]
fn a_complete_download_is_kept_when_its_reader_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (b, h, url, data) = pulled(dir.path(), 5 << 20);
    let lease = b.fetch(&h, &remote(&url)).unwrap().unwrap();
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
        assert!(b.ensure_local(&h, &remote(&url), &|| true).unwrap());
        let meta = std::fs::metadata(b.blobs().blob_path(&h)).unwrap();
        let data_blocks = (len - zeros.len()) as u64 / 512;
        assert!(
            meta.blocks() <= data_blocks + 64,
            "{len}: {} blocks on disk for {data_blocks} blocks of data",
            meta.blocks()
        );
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut b.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
        assert!(got == data, "{len}: content differs");
        let vb = b.volume("default", false, 0, 0).unwrap();
        let f = b.ns().lookup(vb.root, b"f").unwrap();
        assert_eq!(f.blob_blocks, Some(meta.blocks()));
    }
}

/// A download joined from another mount's upstreams that fails there (a hung upstream,
/// given up after its bound) does not fail a caller whose own upstreams have the blob: it
/// is fetched again from those.
#[test]
fn a_joined_download_that_fails_at_the_other_upstreams_is_fetched_from_ones_own() {
    let dir = tempfile::tempdir().unwrap();
    let (b, h, url, data) = pulled(dir.path(), 200_000);
    // Accepts connections (the backlog), never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_remote = Arc::new(
        Remote::new(
            vec![Upstream::parse(&format!("http://{}", hung.local_addr().unwrap())).unwrap()],
            FetchConfig {
                timeout: std::time::Duration::from_secs(2),
            },
        )
        .unwrap(),
    );
    let first = b.fetch(&h, &hung_remote).unwrap().unwrap();
    let t = std::time::Instant::now();
    assert!(b.ensure_local(&h, &remote(&url), &|| true).unwrap());
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1500),
        "fetched at once: the hung download was not joined ({:?})",
        t.elapsed()
    );
    assert!(first.wait(&|| true).is_err(), "the hung download succeeded");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut b.blobs().open_blob(&h).unwrap(), &mut got).unwrap();
    assert!(got == data);
    drop(first);
    assert_eq!(staging_files(&dir.path().join("b")), 0);
}
