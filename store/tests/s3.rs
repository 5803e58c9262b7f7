//! The S3 client against a real S3 implementation: moto's standalone server on loopback,
//! from the pinned test venv.
//!
//! Everything runs in one test function because the client is configured through process-wide
//! environment variables.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kcache_store::objstore::{ObjError as S3Error, ObjStore as S3, UpdateVersion};
use kcache_store::s3;

mod common;

const BUCKET: &str = "kcache-test";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The Python of the pinned test venv with moto in it, or None (skip) outside CI.
fn venv_python() -> Option<PathBuf> {
    let p = std::env::var_os("KCACHE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv-test/bin/python"));
    let has_moto = p.exists()
        && Command::new(&p)
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if has_moto {
        return Some(p);
    }
    assert!(
        std::env::var_os("REQUIRE_FUSE").is_none(),
        "test venv {} is missing or has no moto (create it: python3 -m venv .venv-test && .venv-test/bin/pip install -r tests/py/requirements.txt)",
        p.display()
    );
    eprintln!("skipping: no test venv with moto at {}", p.display());
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A moto server on 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Moto {
    fn start(python: &Path, dir: &Path) -> Moto {
        let port = free_port();
        let log = dir.join("moto.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting moto");
        let mut moto = Moto { child, port, log };
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto exited ({status}): {}", moto.log_text());
            }
            if client.get(moto.url()).send().is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto did not answer within 60 s: {}",
                moto.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("moto answered after {:?}", start.elapsed());
        moto
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server that reads a request and then goes quiet: at once (`silent`), or after the
/// headers and the first bytes of a body.
struct Staller {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Staller {
    fn start(silent: bool) -> Staller {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut req = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        if !silent {
                            let _ = s.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\
                              ETag: \"stall\"\r\nLast-Modified: Mon, 02 Jan 2023 00:00:00 GMT\r\n\
                              Content-Type: application/octet-stream\r\n\r\n0123456789",
                            );
                        }
                        held.push(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Staller {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Staller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_all(s3: &S3, key: &str, range: Option<(u64, Option<u64>)>) -> Vec<u8> {
    let mut r = s3
        .get(key, range)
        .unwrap_or_else(|e| panic!("get {key} {range:?}: {e:?}"));
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("reading {key} {range:?}: {e}"));
    out
}

fn set_env(pairs: &[(&str, &str)]) {
    for (k, v) in pairs {
        std::env::set_var(k, v);
    }
}

#[test]
fn s3_against_moto() {
    let Some(python) = venv_python() else { return };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(&python, dir.path());
    let http = reqwest::blocking::Client::new();
    let resp = http
        .put(format!("{}/{BUCKET}", moto.url()))
        .send()
        .expect("creating the bucket");
    assert!(resp.status().is_success(), "create bucket: {:?}", resp);

    // No credential lookup may leave the machine: without keys object_store would ask the
    // instance metadata service, so point that at a dead loopback port.
    let dead = free_port();
    for k in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
    ] {
        std::env::remove_var(k);
    }
    set_env(&[
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &moto.url()),
        ("AWS_METADATA_ENDPOINT", &format!("http://127.0.0.1:{dead}")),
        (
            "AWS_CONFIG_FILE",
            dir.path().join("no-config").to_str().unwrap(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("no-credentials").to_str().unwrap(),
        ),
    ]);
    let timeout = Duration::from_secs(10);

    // URLs.
    for bad in ["s3://", "s3:///x", "s3:/x", "https://x"] {
        let err = s3::parse(bad, timeout).unwrap_err();
        assert!(err.contains(bad), "error for {bad} does not name it: {err}");
    }
    let s3 = Arc::new(s3::parse(&format!("s3://{BUCKET}"), timeout).unwrap());
    assert_eq!(s3.url_of("tags/x"), format!("s3://{BUCKET}/tags/x"));
    let pfx = s3::parse(&format!("s3://{BUCKET}/some/prefix/"), timeout).unwrap();
    assert_eq!(
        pfx.url_of("blobs/ab/abcd"),
        format!("s3://{BUCKET}/some/prefix/blobs/ab/abcd")
    );

    // Conditional puts, which tag updates rely on: create only if absent, replace only the
    // version read.
    assert!(s3.put_if("tags/cas", b"one", None).unwrap());
    assert!(
        !s3.put_if("tags/cas", b"two", None).unwrap(),
        "created twice"
    );
    let (got, etag) = s3.get_versioned("tags/cas").unwrap().unwrap();
    assert_eq!(got, b"one");
    assert!(etag.e_tag.is_some(), "moto gives ETags");
    assert!(!s3
        .put_if(
            "tags/cas",
            b"two",
            Some(&UpdateVersion {
                e_tag: Some("\"not-the-etag\"".into()),
                version: None,
            })
        )
        .unwrap());
    assert!(s3.put_if("tags/cas", b"two", Some(&etag)).unwrap());
    assert!(
        !s3.put_if("tags/cas", b"three", Some(&etag)).unwrap(),
        "stale ETag won"
    );
    assert_eq!(read_all(&s3, "tags/cas", None), b"two");
    assert!(s3.get_versioned("tags/none").unwrap().is_none());

    // Additive pushes: four stores push different trees to one tag at once, each tag
    // update a conditional PUT on the tag's ETag; a pull has all four trees. Random timing,
    // several rounds.
    let fleet = kcache_store::Upstream::parse(&format!("s3://{BUCKET}/fleet")).unwrap();
    for round in 0..4 {
        common::four_pushers_one_tag(&fleet, &format!("fleet-{round}"), [0, 10, 40][round % 3]);
    }
    eprintln!("additive pushes to S3 done after {:?}", t0.elapsed());

    // Small objects, whole and by range.
    s3.put_bytes("tags/hello", b"hello, world").unwrap();
    assert_eq!(read_all(&s3, "tags/hello", None), b"hello, world");
    assert_eq!(read_all(&s3, "tags/hello", Some((7, None))), b"world");
    assert_eq!(read_all(&s3, "tags/hello", Some((0, Some(5)))), b"hello");
    assert_eq!(read_all(&s3, "tags/hello", Some((3, Some(3)))), b"");
    // A range past the end is cut at the end, as HTTP does.
    assert_eq!(read_all(&s3, "tags/hello", Some((7, Some(100)))), b"world");
    s3.put_bytes("tags/empty", b"").unwrap();
    assert_eq!(read_all(&s3, "tags/empty", None), b"");
    assert!(matches!(
        s3.get("tags/hello", Some((5, Some(2)))),
        Err(S3Error::Fatal(_))
    ));
    // Overwriting replaces.
    s3.put_bytes("tags/hello", b"bye").unwrap();
    assert_eq!(read_all(&s3, "tags/hello", None), b"bye");

    // Missing objects.
    assert!(s3.head("tags/hello").unwrap());
    assert!(!s3.head("tags/nope").unwrap());
    assert!(matches!(s3.get("tags/nope", None), Err(S3Error::Missing)));
    assert!(matches!(
        s3.get("tags/nope", Some((2, None))),
        Err(S3Error::Missing)
    ));
    assert!(matches!(
        s3.get("tags/nope", Some((2, Some(2)))),
        Err(S3Error::Missing)
    ));
    assert!(matches!(s3.get("", None), Err(S3Error::Fatal(_))));
    assert!(matches!(s3.get("/abs", None), Err(S3Error::Fatal(_))));

    // A large file goes up in parts and comes back whole and by ranges.
    let big_len: usize = 40 << 20;
    let mut big = vec![0u8; big_len];
    blake3::Hasher::new()
        .update(b"kcache s3 test")
        .finalize_xof()
        .fill(&mut big);
    let big_path = dir.path().join("big");
    std::fs::write(&big_path, &big).unwrap();
    let t = Instant::now();
    s3.put_file("blobs/bi/big", &big_path).unwrap();
    eprintln!("put_file 40 MiB: {:?}", t.elapsed());
    // S3 names a multipart object's ETag after its part count.
    let etag = http
        .head(format!("{}/{BUCKET}/blobs/bi/big", moto.url()))
        .send()
        .unwrap()
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        etag.as_deref().map(|e| e.ends_with("-5\"")),
        Some(true),
        "{etag:?}"
    );
    let t = Instant::now();
    let back = read_all(&s3, "blobs/bi/big", None);
    eprintln!("get 40 MiB: {:?}", t.elapsed());
    assert!(back == big, "40 MiB object came back different");
    drop(back);
    for (start, end) in [
        (0u64, Some(1u64)),
        (1 << 20, Some((9 << 20) + 17)),
        ((16 << 20) - 3, Some((16 << 20) + 3)),
        (big_len as u64 - 5, None),
        (12_345_678, None),
    ] {
        let got = read_all(&s3, "blobs/bi/big", Some((start, end)));
        let end = end.unwrap_or(big_len as u64);
        assert!(
            got == big[start as usize..end as usize],
            "range {start}..{end} differs"
        );
    }
    // Small reads through the stream see the same bytes.
    let mut r = s3.get("blobs/bi/big", Some((100, Some(100_100)))).unwrap();
    let mut small = [0u8; 7];
    let mut got = Vec::new();
    loop {
        let n = r.read(&mut small).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&small[..n]);
    }
    assert!(got == big[100..100_100]);
    drop(big);

    // A small file is one PUT; a missing one is a local, fatal error naming it.
    let small_path = dir.path().join("small");
    std::fs::write(&small_path, b"small file").unwrap();
    s3.put_file("blobs/sm/small", &small_path).unwrap();
    assert_eq!(read_all(&s3, "blobs/sm/small", None), b"small file");
    match s3.put_file("blobs/sm/x", &dir.path().join("absent")) {
        Err(S3Error::Fatal(m)) => assert!(m.contains("absent"), "{m}"),
        other => panic!("put_file of a missing file: {other:?}"),
    }

    // Listing pages through more than a thousand keys and returns exactly those under the
    // prefix.
    let t = Instant::now();
    let n_keys = 1100;
    let mut expected: Vec<String> = (0..n_keys).map(|i| format!("many/k{i:05}")).collect();
    std::thread::scope(|sc| {
        for chunk in expected.chunks(n_keys / 4 + 1) {
            let s3 = &s3;
            sc.spawn(move || {
                for k in chunk {
                    s3.put_bytes(k, k.as_bytes()).unwrap();
                }
            });
        }
    });
    eprintln!("{n_keys} small PUTs: {:?}", t.elapsed());
    s3.put_bytes("manyother/k0", b"x").unwrap();
    let t = Instant::now();
    let mut listed = s3.list("many/").unwrap();
    eprintln!("LIST of {n_keys} keys: {:?}", t.elapsed());
    listed.sort();
    expected.sort();
    assert_eq!(listed.len(), expected.len());
    assert!(listed == expected, "listed keys differ");
    assert_eq!(s3.list("nothing/").unwrap(), Vec::<String>::new());
    let mut blobs = s3.list("blobs/").unwrap();
    blobs.sort();
    assert_eq!(blobs, vec!["blobs/bi/big", "blobs/sm/small"]);

    // Under a prefix, keys are relative to it in and out.
    pfx.put_bytes("blobs/ab/abcd", b"prefixed").unwrap();
    pfx.put_bytes("tags/t", b"tag").unwrap();
    assert_eq!(read_all(&pfx, "blobs/ab/abcd", None), b"prefixed");
    assert_eq!(pfx.list("blobs/").unwrap(), vec!["blobs/ab/abcd"]);
    let mut all = pfx.list("").unwrap();
    all.sort();
    assert_eq!(all, vec!["blobs/ab/abcd", "tags/t"]);
    assert!(s3.head("some/prefix/tags/t").unwrap());
    assert!(!pfx.head("tags/hello").unwrap());

    // A bucket that does not exist is not "missing object" but a configuration error.
    let nob = s3::parse("s3://no-such-bucket", timeout).unwrap();
    match nob.list("") {
        Err(S3Error::Fatal(m)) => {
            eprintln!("list of a missing bucket: {m}");
            assert!(m.contains("no-such-bucket"), "{m}")
        }
        other => panic!("list of a missing bucket: {other:?}"),
    }
    match nob.put_bytes("k", b"x") {
        Err(S3Error::Fatal(m)) => eprintln!("put to a missing bucket: {m}"),
        other => panic!("put to a missing bucket: {other:?}"),
    }
    match nob.get("k", None).map(drop) {
        Err(S3Error::Fatal(m)) => eprintln!("get from a missing bucket: {m}"),
        other => panic!("get from a missing bucket: {other:?}"),
    }

    // Nobody listening: a transient error, quickly.
    let short = Duration::from_secs(2);
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{dead}"));
    let down = s3::parse(&format!("s3://{BUCKET}"), short).unwrap();
    type Op<'a> = Box<dyn Fn() -> Result<(), S3Error> + 'a>;
    let ops: [(&str, Op); 4] = [
        ("get", Box::new(|| down.get("tags/hello", None).map(drop))),
        ("head", Box::new(|| down.head("tags/hello").map(drop))),
        ("put", Box::new(|| down.put_bytes("tags/x", b"x"))),
        ("list", Box::new(|| down.list("tags/").map(drop))),
    ];
    for (what, op) in ops {
        let t = Instant::now();
        match op() {
            Err(S3Error::Transient(m)) => {
                eprintln!("{what} with nobody listening: {:?}: {m}", t.elapsed());
                assert!(m.contains("127.0.0.1"), "{what}: {m}")
            }
            other => panic!("{what} with nobody listening: {other:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "{what} took {:?}",
            t.elapsed()
        );
    }

    // A server that never answers: a transient error after the timeout (and a retry or two).
    let silent = Staller::start(true);
    std::env::set_var(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", silent.port),
    );
    let mute = s3::parse(&format!("s3://{BUCKET}"), short).unwrap();
    let t = Instant::now();
    match mute.get("blobs/st/stall", None).map(drop) {
        Err(S3Error::Transient(m)) => eprintln!("get from a silent server: {:?}: {m}", t.elapsed()),
        other => panic!("get from a silent server: {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    drop(silent);

    // A transfer that stalls fails instead of hanging.
    let staller = Staller::start(false);
    std::env::set_var(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", staller.port),
    );
    let stalled = s3::parse(&format!("s3://{BUCKET}"), short).unwrap();
    let t = Instant::now();
    let mut r = stalled.get("blobs/st/stall", None).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    let err = loop {
        match r.read(&mut buf) {
            Ok(0) => panic!("stalled body ended"),
            Ok(n) => got += n,
            Err(e) => break e,
        }
    };
    let took = t.elapsed();
    eprintln!("stalled read failed after {took:?} ({got} bytes): {err}");
    assert_eq!(got, 10);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    drop(r);
    drop(staller);

    // Credentials and endpoint from the shared files, with the profile from AWS_PROFILE.
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
    ] {
        std::env::remove_var(k);
    }
    let config = dir.path().join("config");
    let creds = dir.path().join("credentials");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = eu-west-1\n\n[profile moto]\nregion = us-east-1\nendpoint_url = {}\n",
            moto.url()
        ),
    )
    .unwrap();
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n\
         [moto]\naws_access_key_id = test\naws_secret_access_key = test\n",
    )
    .unwrap();
    set_env(&[
        ("AWS_CONFIG_FILE", config.to_str().unwrap()),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ("AWS_PROFILE", "moto"),
    ]);
    let from_files = s3::parse(&format!("s3://{BUCKET}"), timeout).unwrap();
    assert_eq!(read_all(&from_files, "tags/hello", None), b"bye");
    from_files.put_bytes("tags/from-files", b"ok").unwrap();
    assert!(s3.head("tags/from-files").unwrap());
    std::env::set_var("AWS_PROFILE", "absent");
    let err = s3::parse(&format!("s3://{BUCKET}"), timeout).unwrap_err();
    assert!(
        err.contains("absent") && err.contains(&format!("s3://{BUCKET}")),
        "{err}"
    );
    std::env::remove_var("AWS_PROFILE");

    eprintln!("s3 test took {:?}", t0.elapsed());
}
