//! The remote tier on real mounts: push to a shared directory, pull on another store, lazy
//! fetch over file:// and HTTP (a static server on loopback), eviction that keeps names,
//! upstreams that lie or hang.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kcache_tests::{
    hash_file, kcache, kcache_env, kcache_ok, pseudo_random, venv_python, workspace, Mount,
};

/// Every file and symlink under `root`, with content hashes.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if m.file_type().is_symlink() {
                out.push(format!("{rel} -> {}", fs::read_link(&p).unwrap().display()));
            } else if m.is_dir() {
                stack.push(p);
            } else {
                out.push(format!("{rel} {}", hash_file(&p)));
            }
        }
    }
    out.sort();
    out
}

/// A static HTTP server over `dir` on loopback (python's http.server).
struct Static {
    child: Child,
    url: String,
}

impl Static {
    fn start(dir: &Path) -> Static {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "http.server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Static {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Static {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kcache serve` of a store on loopback.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(store: &Path) -> Serve {
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(kcache_tests::kcache_bin())
            .args([
                "serve",
                "--store",
                store.to_str().unwrap(),
                "--listen",
                &listen,
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "kcache serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve {
            child,
            url: format!("http://{listen}"),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blob_files(up: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in fs::read_dir(up.join("blobs")).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v
}

/// An S3-compatible server (moto) on loopback with one bucket, stopped on drop.
struct S3Server {
    child: Child,
    /// Settings that point kcache at it, and at nothing else on this machine.
    env: Vec<(String, String)>,
}

impl S3Server {
    fn start(py: &Path, bucket: &str, dir: &Path) -> S3Server {
        let (child, url) =
            kcache_tests::start_announcing_with(py, "s3_server.py", &[bucket.as_ref()], "url: ");
        let none = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        let env = vec![
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), url.clone()),
            ("AWS_CONFIG_FILE".into(), none("no-aws-config")),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                none("no-aws-credentials"),
            ),
        ];
        S3Server { child, env }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn push_a_pip_cache_pull_it_elsewhere_and_fetch_lazily_over_s3_file_http_and_kcache_serve() {
    let Some(py) = venv_python() else { return };
    let Some(a) = Mount::new() else { return };
    let up = tempfile::tempdir().unwrap();
    let up_url = format!("file://{}", up.path().display());
    // Store A: a real pip cache, pushed to a shared directory. The index's port is fixed, so
    // pip on the other stores asks for the same URLs.
    let cache = a.path("pip");
    fs::create_dir(&cache).unwrap();
    let work = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let out = Command::new(&py)
        .arg(workspace().join("tests/py/pip_cache_check.py"))
        .arg(&cache)
        .arg(work.path())
        .args(["--port", &port])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.settle();
    let store_a = a.store.to_str().unwrap().to_owned();
    // The S3 settings go to every command (and the daemons they start); the other
    // upstreams ignore them.
    let s3_dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&py, "kcache-test", s3_dir.path());
    let env: Vec<(&str, &str)> = s3.env.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let kc = |args: &[&str]| {
        let (code, out) = kcache_env(args, &env);
        assert_eq!(code, 0, "kcache {args:?} failed:\n{out}");
        out
    };
    let s3_url = "s3://kcache-test/team/pip";
    // A bucket that does not exist is named in the error, and nothing is half-pushed.
    let (code, out) = kcache_env(
        &["push", "--store", &store_a, "s3://no-such-bucket/x"],
        &env,
    );
    assert!(code != 0 && out.contains("no-such-bucket"), "{code}: {out}");
    eprintln!("push to a missing bucket: {}", out.trim());
    for url in [&up_url[..], s3_url] {
        let out = kc(&["push", "--store", &store_a, url, "--tag", "ci"]);
        assert!(out.contains("0 already there"), "{url}: {out}");
        let again = kc(&["push", "--store", &store_a, url, "--tag", "ci"]);
        assert!(
            again.contains(" 0 blobs uploaded"),
            "a second push to {url} uploads nothing: {again}"
        );
    }

    // Stores pulling from S3, over file://, over HTTP from a static server, and from store
    // A's own `kcache serve`: pull is metadata only; content comes on open.
    let http = Static::start(up.path());
    let serve = Serve::start(&a.store);
    let want = tree(&cache);
    for source in [
        format!("{s3_url}:ci"),
        format!("{up_url}:ci"),
        format!("{}:ci", http.url),
        format!("{}:default", serve.url),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store_b = dir.path().join("store");
        let out = kc(&["pull", "--store", store_b.to_str().unwrap(), &source]);
        assert!(out.contains("to fetch on first open"), "{out}");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        kc(&[
            "mount",
            "--store",
            store_b.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]);
        let stats = |k: &str| {
            let (_, out) = kcache(&["stats", "--json", mnt.to_str().unwrap()]);
            serde_json::from_str::<serde_json::Value>(&out).unwrap()[k]
                .as_u64()
                .unwrap()
        };
        assert_eq!(stats("usage_bytes"), 0, "nothing is fetched before an open");
        assert_eq!(tree(&mnt.join("pip")), want, "pulled from {source}");
        assert!(stats("usage_bytes") > 0);
        // Evicting keeps every name: the content has a remote copy and comes back on open.
        kcache_ok(&["evict", mnt.to_str().unwrap(), "--to", "0"]);
        assert_eq!(stats("usage_bytes"), 0);
        // prefetch brings it all back without reading it.
        let out = kcache_ok(&["prefetch", mnt.join("pip").to_str().unwrap()]);
        assert!(
            out.contains("prefetched") && !out.contains("failed"),
            "{out}"
        );
        assert!(stats("usage_bytes") > 0);
        kcache_ok(&["evict", mnt.to_str().unwrap(), "--to", "0"]);
        assert_eq!(
            tree(&mnt.join("pip")),
            want,
            "after eviction, from {source}"
        );
        // pip installs from the pulled cache (evicted just before, so what it reads is
        // fetched lazily) with the wheel server stopped.
        kcache_ok(&["evict", mnt.to_str().unwrap(), "--to", "0"]);
        let out = Command::new(&py)
            .arg(workspace().join("tests/py/pip_cache_check.py"))
            .arg(mnt.join("pip"))
            .arg(work.path())
            .args(["--port", &port, "--cached-only"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip from the cache pulled from {source}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        kcache_ok(&["umount", mnt.to_str().unwrap()]);
    }
}

#[test]
fn wrong_bytes_fail_over_or_give_eio_and_a_hung_upstream_gives_eio_in_time() {
    let Some(a) = Mount::new() else { return };
    let good = tempfile::tempdir().unwrap();
    let bad = tempfile::tempdir().unwrap();
    fs::write(a.path("f"), pseudo_random(1, 300_000)).unwrap();
    // Large enough for an outboard: verified and served group by group.
    fs::write(a.path("g"), pseudo_random(2, 5 << 20)).unwrap();
    a.settle();
    let store_a = a.store.to_str().unwrap().to_owned();
    for up in [good.path(), bad.path()] {
        kcache_ok(&[
            "push",
            "--store",
            &store_a,
            &format!("file://{}", up.display()),
        ]);
    }
    // The bad upstream flips a byte in every blob: the first one in the small blob, one in
    // the fourth 1 MiB group of the large one, so its stream fails over mid-way.
    for b in blob_files(bad.path()) {
        let mut data = fs::read(&b).unwrap();
        let at = if data.len() > 4 << 20 {
            (7 << 19) + 3
        } else {
            0
        };
        data[at] ^= 1;
        fs::write(&b, data).unwrap();
    }
    // A hung upstream: accepts connections, never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("http://{}", hung.local_addr().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap().to_owned();
    kcache_ok(&[
        "pull",
        "--store",
        &s,
        &format!("file://{}", good.path().display()),
    ]);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap().to_owned();
    let mount = |opts: &str| kcache_ok(&["mount", "--store", &s, "-o", opts, &m]);
    let bad_url = format!("file://{}", bad.path().display());
    let good_url = format!("file://{}", good.path().display());

    // Bad only: EIO, and nothing wrong is cached.
    mount(&format!("upstream={bad_url}"));
    let e = fs::read(mnt.join("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = fs::read(mnt.join("g")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    kcache_ok(&["umount", &m]);
    let log = fs::read_to_string(store.join("kcache.log")).unwrap();
    assert!(log.contains("upstream sent wrong bytes"), "{log}");
    // Bad first, good second: fails over, correct bytes.
    mount(&format!("upstream={bad_url},upstream={good_url}"));
    assert_eq!(fs::read(mnt.join("f")).unwrap(), pseudo_random(1, 300_000));
    assert!(fs::read(mnt.join("g")).unwrap() == pseudo_random(2, 5 << 20));
    kcache_ok(&["evict", &m, "--to", "0"]);
    // Appending through create (O_CREAT on an existing name, as `open(p, "ab")` does) waits
    // for the whole content, then adds to it.
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(mnt.join("g"))
            .unwrap();
        f.write_all(b"!").unwrap();
    }
    let mut want = pseudo_random(2, 5 << 20);
    want.push(b'!');
    assert!(
        fs::read(mnt.join("g")).unwrap() == want,
        "append via create"
    );
    kcache_ok(&["umount", &m]);

    // Hung only, with a 3 s bound: EIO within the bound, and local files stay readable.
    mount(&format!("upstream={hung_url},fetch_timeout=3"));
    fs::write(mnt.join("local-only"), b"stays readable").unwrap();
    // An open (and a create, O_CREAT on the existing name) of the hung file: EIO within the
    // bound, and local files answer at once meanwhile.
    let eio_in_time = |what: &str, open: fn(PathBuf) -> std::io::Result<fs::File>| {
        let t = Instant::now();
        let waiting = std::thread::spawn({
            let p = mnt.join("f");
            move || open(p).unwrap_err().raw_os_error()
        });
        std::thread::sleep(Duration::from_millis(300));
        let t_local = Instant::now();
        assert_eq!(fs::read(mnt.join("local-only")).unwrap(), b"stays readable");
        assert!(
            t_local.elapsed() < Duration::from_secs(1),
            "local reads were held up by a waiting {what}"
        );
        assert_eq!(waiting.join().unwrap(), Some(libc::EIO), "{what}");
        let waited = t.elapsed();
        assert!(
            waited < Duration::from_secs(20),
            "the {what} took {waited:?} with a 3 s bound"
        );
    };
    eio_in_time("open", fs::File::open);
    eio_in_time("create", |p| {
        fs::OpenOptions::new().append(true).create(true).open(p)
    });
    kcache_ok(&["umount", &m]);
    drop(hung);
}

/// tests/py/static_server.py: a static server that counts what it sends.
struct Counting {
    child: Child,
    url: String,
}

impl Counting {
    fn start(dir: &Path) -> Counting {
        Counting::start_with(dir, &[])
    }

    /// With more options for static_server.py (`--rate N`, `--no-ranges`).
    fn start_with(dir: &Path, opts: &[&str]) -> Counting {
        let mut args = vec![dir.as_os_str()];
        args.extend(opts.iter().map(std::ffi::OsStr::new));
        let (child, url) = kcache_tests::start_announcing_with(
            Path::new("python3"),
            "static_server.py",
            &args,
            "url: ",
        );
        Counting { child, url }
    }

    /// Stops the server; returns bytes sent per path.
    fn stop(self) -> serde_json::Value {
        self.stop_all().0
    }

    /// Stops the server; returns bytes sent per path, and ranged answers (206) per path.
    fn stop_all(mut self) -> (serde_json::Value, serde_json::Value) {
        use std::io::Read;
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = self.child.wait();
        let field = |name: &str| -> serde_json::Value {
            let line = out
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name:?} line in {out:?}"));
            serde_json::from_str(line).unwrap()
        };
        (field("sent: "), field("ranges: "))
    }
}

#[test]
fn twenty_readers_on_two_mounts_cause_one_download() {
    let Some(a) = Mount::new() else { return };
    let up = tempfile::tempdir().unwrap();
    let size = 8 << 20;
    fs::write(a.path("big"), pseudo_random(5, size)).unwrap();
    a.settle();
    let store_a = a.store.to_str().unwrap().to_owned();
    kcache_ok(&[
        "push",
        "--store",
        &store_a,
        &format!("file://{}", up.path().display()),
    ]);
    let server = Counting::start(up.path());

    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("store").to_str().unwrap().to_owned();
    // The same snapshot in two volumes, mounted at two places: one blob, two mounts.
    let mut mnts = Vec::new();
    for v in ["one", "two"] {
        kcache_ok(&[
            "pull",
            "--store",
            &s,
            "--volume",
            v,
            &format!("{}:default", server.url),
        ]);
        let mnt = dir.path().join(v);
        fs::create_dir(&mnt).unwrap();
        mnts.push(mnt);
    }
    kcache_ok(&[
        "mount",
        "--store",
        &s,
        "--volume",
        "one",
        mnts[0].to_str().unwrap(),
    ]);
    kcache_ok(&[
        "mount",
        "--store",
        &s,
        "--volume",
        "two",
        mnts[1].to_str().unwrap(),
    ]);
    let want = pseudo_random(5, size);
    let readers: Vec<_> = (0..20)
        .map(|i| {
            let p = mnts[i % 2].join("big");
            std::thread::spawn(move || fs::read(p).unwrap())
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == want, "a reader got wrong bytes");
    }
    kcache_ok(&["umount", mnts[1].to_str().unwrap()]);
    kcache_ok(&["umount", mnts[0].to_str().unwrap()]);
    let sent = server.stop();
    let blob_bytes: u64 = sent
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("/blobs/"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(blob_bytes, size as u64, "the server sent {sent}");
}

/// Two volumes of one store mounted by one daemon (the second by `kcache mount` into the
/// running daemon), each with its own `upstream=`: each mount fetches from its own upstream
/// (the second mount's option does not replace the first's), and a file read through both
/// while it downloads is downloaded once, from the first mount's upstream, even though the
/// second's does not have it. Blob p is only on upstream A, q only on B, big only on A.
#[test]
fn two_mounts_fetch_from_their_own_upstreams_and_share_one_download() {
    let Some(a) = Mount::new() else { return };
    let size = 8 << 20;
    fs::write(a.path("p"), pseudo_random(11, 300_000)).unwrap();
    fs::write(a.path("q"), pseudo_random(12, 300_000)).unwrap();
    fs::write(a.path("big"), pseudo_random(13, size)).unwrap();
    a.settle();
    let key = |name: &str| {
        let hex = hash_file(&a.path(name)).to_hex().to_string();
        format!("blobs/{}/{hex}", &hex[..2])
    };
    let up_a = tempfile::tempdir().unwrap();
    let up_b = tempfile::tempdir().unwrap();
    let store_a = a.store.to_str().unwrap().to_owned();
    for up in [up_a.path(), up_b.path()] {
        kcache_ok(&[
            "push",
            "--store",
            &store_a,
            &format!("file://{}", up.display()),
        ]);
    }
    fs::remove_file(up_a.path().join(key("q"))).unwrap();
    fs::remove_file(up_b.path().join(key("p"))).unwrap();
    fs::remove_file(up_b.path().join(key("big"))).unwrap();
    // About 2 s for the big file: the second mount's reader comes while it downloads.
    let server_a = Counting::start_with(up_a.path(), &["--rate", "4000000"]);
    let server_b = Counting::start(up_b.path());

    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("store").to_str().unwrap().to_owned();
    let mut mnts = Vec::new();
    for v in ["one", "two"] {
        kcache_ok(&[
            "pull",
            "--store",
            &s,
            "--volume",
            v,
            &format!("file://{}:default", up_a.path().display()),
        ]);
        let mnt = dir.path().join(v);
        fs::create_dir(&mnt).unwrap();
        mnts.push(mnt);
    }
    for (v, url) in [("one", &server_a.url), ("two", &server_b.url)] {
        let i = if v == "one" { 0 } else { 1 };
        kcache_ok(&[
            "mount",
            "--store",
            &s,
            "--volume",
            v,
            "-o",
            &format!("upstream={url}"),
            mnts[i].to_str().unwrap(),
        ]);
    }
    // Each mount's own upstream: one cannot get q (only B has it), two cannot get p.
    let e = fs::read(mnts[0].join("q")).map(|d| d.len()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "one/q: {e}");
    let e = fs::read(mnts[1].join("p")).map(|d| d.len()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "two/p: {e}");
    assert!(fs::read(mnts[0].join("p")).unwrap() == pseudo_random(11, 300_000));
    assert!(fs::read(mnts[1].join("q")).unwrap() == pseudo_random(12, 300_000));

    // One download, whichever mount asks: two's upstream lacks big, so two reads it only by
    // joining the download one started.
    let want = pseudo_random(13, size);
    let first = std::thread::spawn({
        let p = mnts[0].join("big");
        move || {
            let got = fs::read(p).unwrap();
            (got, Instant::now())
        }
    });
    let t = Instant::now();
    while staging_files(&s) == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let second_start = Instant::now();
    let second = fs::read(mnts[1].join("big")).expect("two did not join one's download");
    let (got, first_end) = first.join().unwrap();
    assert!(got == want, "one/big: wrong bytes");
    assert!(second == want, "two/big: wrong bytes");
    assert!(
        second_start < first_end,
        "the download ended before the second reader came; the test proves nothing"
    );
    kcache_ok(&["umount", mnts[1].to_str().unwrap()]);
    kcache_ok(&["umount", mnts[0].to_str().unwrap()]);
    drop(server_b);
    let sent_a = server_a.stop();
    assert_eq!(
        sent_a
            .get(format!("/{}", key("big")))
            .and_then(|v| v.as_u64()),
        Some(size as u64),
        "big was not downloaded exactly once: A sent {sent_a}"
    );
    assert_eq!(staging_files(&s), 0);
}

#[test]
fn kcache_serve_is_an_upstream_with_ranges() {
    let Some(a) = Mount::new() else { return };
    fs::create_dir(a.path("d")).unwrap();
    fs::write(a.path("d/f"), pseudo_random(9, 200_000)).unwrap();
    std::os::unix::fs::symlink("d/f", a.path("link")).unwrap();
    a.settle();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Command::new(kcache_tests::kcache_bin())
        .args([
            "serve",
            "--store",
            a.store.to_str().unwrap(),
            "--listen",
            &listen,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "kcache serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A byte range of a blob.
    let h = hash_file(&a.path("d/f")).to_hex().to_string();
    let raw = |req: &str| -> Vec<u8> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&listen).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut v = Vec::new();
        c.read_to_end(&mut v).unwrap();
        v
    };
    let resp = raw(&format!(
        "GET /blobs/{}/{h} HTTP/1.0\r\nRange: bytes=1000-1999\r\n\r\n",
        &h[..2]
    ));
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.starts_with("HTTP/1.1 206") || text.starts_with("HTTP/1.0 206"),
        "{text:.200}"
    );
    assert!(text.contains("bytes 1000-1999/200000"), "{text:.300}");
    let body = &resp[resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    assert_eq!(body, &pseudo_random(9, 200_000)[1000..2000]);

    // Another store pulls the volume straight from it.
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("store").to_str().unwrap().to_owned();
    kcache_ok(&["pull", "--store", &s, &format!("http://{listen}:default")]);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    kcache_ok(&["mount", "--store", &s, mnt.to_str().unwrap()]);
    assert_eq!(tree(&mnt), tree(&a.mnt));
    kcache_ok(&["umount", mnt.to_str().unwrap()]);
    let _ = serve.kill();
    let _ = serve.wait();
}

#[test]
fn signed_snapshots_pull_only_with_the_trusted_key() {
    let Some(a) = Mount::new() else { return };
    fs::write(a.path("f"), b"signed content").unwrap();
    a.settle();
    let keys = tempfile::tempdir().unwrap();
    let k1 = keys.path().join("k1");
    let k2 = keys.path().join("k2");
    // The public key is the first line printed (stdout; the note about the files follows).
    let keygen = |k: &Path| {
        kcache_ok(&["keygen", "--out", k.to_str().unwrap()])
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_owned()
    };
    let (pub1, pub2) = (keygen(&k1), keygen(&k2));
    assert_eq!(pub1.len(), 64, "{pub1}");
    assert_ne!(pub1, pub2);
    let up = tempfile::tempdir().unwrap();
    let url = format!("file://{}", up.path().display());
    let sa = a.store.to_str().unwrap().to_owned();
    kcache_ok(&[
        "push",
        "--store",
        &sa,
        &url,
        "--tag",
        "signed",
        "--sign",
        k1.to_str().unwrap(),
    ]);
    kcache_ok(&["push", "--store", &sa, &url, "--tag", "plain"]);

    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("store").to_str().unwrap().to_owned();
    // The wrong key is refused, naming the key that signed.
    let (code, out) = kcache(&[
        "pull",
        "--store",
        &s,
        "--trusted-key",
        &pub2,
        &format!("{url}:signed"),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not a trusted key") && out.contains(&pub1),
        "{out}"
    );
    // The right key (given as its .pub file) works.
    let out = kcache_ok(&[
        "pull",
        "--store",
        &s,
        "--trusted-key",
        k1.with_extension("pub").to_str().unwrap(),
        &format!("{url}:signed"),
    ]);
    assert!(out.contains("1 files"), "{out}");
    // Once keys are trusted, an unsigned snapshot is refused even without --trusted-key.
    let (code, out) = kcache(&[
        "pull",
        "--store",
        &s,
        "--volume",
        "other",
        &format!("{url}:plain"),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is unsigned"), "{out}");
    // A tampered signature does not verify.
    let tag = up.path().join("tags/signed");
    let text = fs::read_to_string(&tag).unwrap();
    let (head, sig) = text.trim_end().rsplit_once(' ').unwrap();
    let flipped: String = sig
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 0 {
                if c == '0' {
                    '1'
                } else {
                    '0'
                }
            } else {
                c
            }
        })
        .collect();
    fs::write(&tag, format!("{head} {flipped}\n")).unwrap();
    let (code, out) = kcache(&[
        "pull",
        "--store",
        &s,
        "--volume",
        "third",
        &format!("{url}:signed"),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not verify"), "{out}");
}

impl Drop for Counting {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pulls `url:default` into a fresh store `dir/store` and mounts it at `dir/mnt`; returns
/// (store, mountpoint).
fn pull_and_mount(dir: &Path, url: &str, extra: &[&str]) -> (String, PathBuf) {
    let s = dir.join("store").to_str().unwrap().to_owned();
    kcache_ok(&["pull", "--store", &s, &format!("{url}:default")]);
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut args = vec!["mount", "--store", &s];
    args.extend_from_slice(extra);
    args.push(mnt.to_str().unwrap());
    kcache_ok(&args);
    (s, mnt)
}

fn staging_files(store: &str) -> usize {
    fs::read_dir(Path::new(store).join("staging"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn pread(f: &fs::File, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Test 4: a 2 GiB remote file on a server capped at 256 MiB/s (so the download takes about
/// 8 s): the first bytes come long before the end, random reads all over it are right (the
/// far ones fetched first, by range), and at the end the blob is local and verified.
#[test]
fn a_2_gib_remote_file_is_read_while_it_downloads() {
    let Some(a) = Mount::new() else { return };
    const SIZE: u64 = 2 << 30;
    {
        let mut src = fs::File::open("/dev/urandom").unwrap();
        let mut dst = fs::File::create(a.path("big")).unwrap();
        let n = std::io::copy(&mut std::io::Read::take(&mut src, SIZE), &mut dst).unwrap();
        assert_eq!(n, SIZE);
    }
    a.settle();
    let up = tempfile::tempdir().unwrap();
    let store_a = a.store.to_str().unwrap().to_owned();
    kcache_ok(&[
        "push",
        "--store",
        &store_a,
        &format!("file://{}", up.path().display()),
    ]);
    assert!(
        up.path().join("outboards").is_dir(),
        "push wrote no outboard"
    );
    let server = Counting::start_with(up.path(), &["--rate", &(256u64 << 20).to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let (s, mnt) = pull_and_mount(dir.path(), &server.url, &[]);
    let local = fs::File::open(a.path("big")).unwrap();

    let t0 = Instant::now();
    let f = fs::File::open(mnt.join("big")).unwrap();
    let first = pread(&f, 0, 4096);
    let ttfb = t0.elapsed();
    assert!(first == pread(&local, 0, 4096), "first 4 KiB differ");

    // Random reads across the whole file, while it downloads.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let t1 = Instant::now();
    for _ in 0..64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x % 65_536) as usize;
        let off = (x >> 20) % (SIZE - len as u64);
        assert!(
            pread(&f, off, len) == pread(&local, off, len),
            "bytes {off}..+{len} differ"
        );
    }
    let random = t1.elapsed();
    // Then everything, in order: this waits for the rest of the download.
    let mut off = 0;
    while off < SIZE {
        let len = (8 << 20).min(SIZE - off) as usize;
        assert!(
            pread(&f, off, len) == pread(&local, off, len),
            "bytes {off}..+{len} differ"
        );
        off += len as u64;
    }
    let full = t0.elapsed();
    eprintln!(
        "first 4 KiB after {ttfb:?}, 64 random reads in {random:?}, all of it after {full:?}"
    );
    assert!(
        ttfb < Duration::from_secs(1) && ttfb * 5 < full,
        "first bytes after {ttfb:?}, the whole file after {full:?}"
    );
    drop(f);
    kcache_ok(&["umount", mnt.to_str().unwrap()]);
    let (sent, ranges) = server.stop_all();
    let blob = blob_files(up.path()).pop().unwrap();
    let key = format!("/{}", blob.strip_prefix(up.path()).unwrap().display());
    let ranged = ranges[&key].as_u64().unwrap_or(0);
    assert!(ranged > 0, "far reads did not fetch by range: {ranges}");
    // The stream, plus each ranged group (1 MiB) at most twice: once by range, once more
    // when the stream runs past a lone fetched group rather than starting a new request.
    let blob_sent = sent[&key].as_u64().unwrap();
    eprintln!("sent {blob_sent} bytes of the blob, {ranged} ranged requests");
    assert!(
        blob_sent <= SIZE + 2 * ranged * (1 << 20),
        "the server sent {blob_sent} bytes of the blob with {ranged} ranged requests"
    );
    // Local now, and verified: the blob file is there, whole, and `verify` checks its hash.
    let name = blob.file_name().unwrap().to_str().unwrap();
    let local_blob = Path::new(&s).join("blobs").join(&name[..2]).join(name);
    assert_eq!(fs::metadata(&local_blob).unwrap().len(), SIZE);
    assert_eq!(staging_files(&s), 0);
    let out = kcache_ok(&["verify", "--store", &s]);
    assert!(
        out.contains("checked 1 blobs") && !out.contains("quarantined") && !out.contains("missing"),
        "verify: {out}"
    );
}

/// A reader killed while its download runs cancels it when nobody else wants it: both a
/// streaming reader (large file with an outboard) and an open waiting for a small file.
#[test]
fn a_killed_reader_cancels_a_download_nobody_else_wants() {
    let Some(a) = Mount::new() else { return };
    fs::write(a.path("big"), pseudo_random(21, 64 << 20)).unwrap();
    fs::write(a.path("small"), pseudo_random(22, 1 << 20)).unwrap();
    a.settle();
    let up = tempfile::tempdir().unwrap();
    kcache_ok(&[
        "push",
        "--store",
        a.store.to_str().unwrap(),
        &format!("file://{}", up.path().display()),
    ]);
    // 256 KiB/s: the small file takes 4 s, the big one minutes.
    let server = Counting::start_with(up.path(), &["--rate", "262144"]);
    let dir = tempfile::tempdir().unwrap();
    let (s, mnt) = pull_and_mount(dir.path(), &server.url, &[]);

    for (name, code) in [
        // Streams: the first 4 KiB come at once; then it sits with the file open.
        (
            "big",
            "import sys,time; f=open(sys.argv[1],'rb'); f.read(4096); print('read', flush=True); time.sleep(120)",
        ),
        // Waits in open() for the whole (verified) file.
        (
            "small",
            "import sys; print('read', flush=True); open(sys.argv[1],'rb').read()",
        ),
    ] {
        let mut child = Command::new("python3")
            .args(["-c", code])
            .arg(mnt.join(name))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "read");
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(staging_files(&s), 1, "{name}: no download under way");
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while staging_files(&s) > 0 {
            assert!(
                Instant::now() < deadline,
                "{name}: the download went on after its only reader was killed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A later reader starts afresh and gets the right bytes.
    assert!(fs::read(mnt.join("small")).unwrap() == pseudo_random(22, 1 << 20));
    kcache_ok(&["umount", mnt.to_str().unwrap()]);
    let sent = server.stop();
    eprintln!("sent: {sent}");
}

/// Downloads count against the quota like writes: each open that fetches makes room first
/// and lets the evictor catch up before it returns, so reading a pulled volume five times
/// the quota never takes the store past it; a file larger than the quota is refused with
/// ENOSPC before anything is downloaded.
#[test]
fn downloads_stay_within_the_quota() {
    let Some(a) = Mount::new() else { return };
    const MIB: u64 = 1 << 20;
    for i in 0..10 {
        fs::write(
            a.path(&format!("f{i}")),
            pseudo_random(100 + i, MIB as usize),
        )
        .unwrap();
    }
    fs::write(a.path("huge"), pseudo_random(99, 6 * MIB as usize)).unwrap();
    a.settle();
    let up = tempfile::tempdir().unwrap();
    kcache_ok(&[
        "push",
        "--store",
        a.store.to_str().unwrap(),
        &format!("file://{}", up.path().display()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", up.path().display());
    let (s, mnt) = pull_and_mount(dir.path(), &url, &["-o", "quota=3M"]);
    let usage = || {
        let (_, out) = kcache(&["stats", "--json", mnt.to_str().unwrap()]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["usage_bytes"]
            .as_u64()
            .unwrap()
    };
    for round in 0..2 {
        for i in 0..10 {
            let name = format!("f{i}");
            assert!(
                fs::read(mnt.join(&name)).unwrap() == fs::read(a.path(&name)).unwrap(),
                "{name} differs (round {round})"
            );
            let used = usage();
            assert!(
                used <= 3 * MIB,
                "after reading {name} (round {round}) the store holds {used} bytes"
            );
        }
    }
    let err = fs::File::open(mnt.join("huge")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(staging_files(&s), 0);
    // Every name is still there; evicted content comes back on the next open.
    assert!(fs::read(mnt.join("f0")).unwrap() == fs::read(a.path("f0")).unwrap());
    kcache_ok(&["umount", mnt.to_str().unwrap()]);
}

/// Reads `p` by path over and over until `stop`; every read must find the file and give one
/// of `allowed` whole. Returns how many reads it made.
fn keep_reading(
    p: PathBuf,
    allowed: Vec<Vec<u8>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let got = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(
                allowed.contains(&got),
                "{}: a reader saw {} bytes, neither the old nor the new file whole",
                p.display(),
                got.len()
            );
            n += 1;
        }
        n
    })
}

/// Issue 13, item 1: `kcache pull` merges a snapshot into a mounted volume while readers hold
/// files open and writers write. Open files keep what they opened, readers by path see the
/// old or the new file whole, new names appear at once (fetched on open), local-only names
/// stay, conflicts keep the volume's file by default and take the snapshot's with --theirs
/// (a directory against a file never), the counts are right, and --replace or a bad manifest
/// leaves the live volume as it was.
#[test]
fn a_pull_merges_into_a_mounted_volume_under_readers_and_writers() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let Some(a) = Mount::new() else { return };
    let up = tempfile::tempdir().unwrap();
    let url = format!("file://{}", up.path().display());
    let big_theirs = pseudo_random(21, 3 << 20);
    let big_ours = pseudo_random(22, 4 << 20);
    fs::create_dir_all(a.path("new/deep")).unwrap();
    fs::write(a.path("new/deep/f1"), pseudo_random(23, 1 << 20)).unwrap();
    // Enough names that the merges take a while, with readers and writers busy throughout.
    fs::create_dir(a.path("many")).unwrap();
    for i in 0..500 {
        fs::write(a.path(&format!("many/m{i}")), format!("file {i}")).unwrap();
    }
    fs::write(a.path("newfile"), b"a new file from the snapshot").unwrap();
    fs::write(a.path("conflict_open"), &big_theirs).unwrap();
    fs::write(a.path("conflict_kept"), b"theirs").unwrap();
    fs::write(
        a.path("conflict_written"),
        b"theirs, over a file being written",
    )
    .unwrap();
    fs::write(a.path("same"), b"the same on both sides").unwrap();
    fs::create_dir(a.path("dir_vs_file")).unwrap();
    fs::write(a.path("dir_vs_file/inner"), b"inner").unwrap();
    a.settle();
    let store_a = a.store.to_str().unwrap().to_owned();
    kcache_ok(&["push", "--store", &store_a, &url]);
    let source = format!("{url}:default");

    let b = Mount::new().unwrap();
    let store_b = b.store.to_str().unwrap().to_owned();
    fs::write(b.path("local_only"), b"only here").unwrap();
    fs::write(b.path("conflict_open"), &big_ours).unwrap();
    fs::write(b.path("conflict_kept"), b"ours").unwrap();
    fs::write(b.path("same"), b"the same on both sides").unwrap();
    fs::write(b.path("dir_vs_file"), b"a file here").unwrap();
    b.settle();
    // The kernel has looked these up (and cached them) before the pull.
    assert!(fs::metadata(b.path("newfile")).is_err());
    assert_eq!(fs::read(b.path("conflict_kept")).unwrap(), b"ours");

    // Held open across both pulls: a reader half-way through a file the second pull
    // replaces, a writer on a local-only name, a writer on a name the second pull replaces.
    let mut held = fs::File::open(b.path("conflict_open")).unwrap();
    let mut first = vec![0u8; big_ours.len() / 2];
    held.read_exact(&mut first).unwrap();
    let mut log = fs::File::create(b.path("log")).unwrap();
    log.write_all(b"before the pulls\n").unwrap();
    let mut written = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(b.path("conflict_written"))
        .unwrap();
    written.write_all(b"ours, being written").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let readers = vec![
        keep_reading(
            b.path("conflict_open"),
            vec![big_ours.clone(), big_theirs.clone()],
            stop.clone(),
        ),
        keep_reading(
            b.path("conflict_kept"),
            vec![b"ours".to_vec(), b"theirs".to_vec()],
            stop.clone(),
        ),
        keep_reading(
            b.path("local_only"),
            vec![b"only here".to_vec()],
            stop.clone(),
        ),
    ];

    // A writer making files the way pip does (temp file, then rename into place) all along.
    fs::create_dir(b.path("work")).unwrap();
    let writer = {
        let (dir, stop) = (b.path("work"), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let tmp = dir.join(format!(".tmp{n}"));
                fs::write(&tmp, pseudo_random(n, 4096 + n as usize)).unwrap();
                fs::rename(&tmp, dir.join(format!("w{n}"))).unwrap();
                n += 1;
            }
            n
        })
    };

    // A merge keeps every conflict local.
    let out = kcache_ok(&["pull", "--store", &store_b, &source]);
    assert!(
        out.contains(
            "505 added, 0 updated, 1 unchanged, 4 kept, 0 conflicts skipped, 3 only local"
        ),
        "{out}"
    );
    for p in [
        "conflict_open",
        "conflict_kept",
        "conflict_written",
        "dir_vs_file",
    ] {
        assert!(out.contains(p), "{p} is named as a conflict: {out}");
    }
    // New names at once, content fetched on first open.
    assert_eq!(
        fs::read(b.path("newfile")).unwrap(),
        b"a new file from the snapshot"
    );
    assert_eq!(
        fs::read(b.path("new/deep/f1")).unwrap(),
        pseudo_random(23, 1 << 20)
    );
    assert_eq!(fs::read(b.path("many/m499")).unwrap(), b"file 499");
    assert_eq!(fs::read(b.path("conflict_kept")).unwrap(), b"ours");
    assert_eq!(fs::read(b.path("dir_vs_file")).unwrap(), b"a file here");
    log.write_all(b"between the pulls\n").unwrap();

    // --replace would pull the names out from under the mount: refused, nothing changes.
    let (code, out) = kcache(&["pull", "--replace", "--store", &store_b, &source]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("is mounted"), "{out}");
    // A garbled manifest is refused with a message naming it; nothing changes.
    let junk = b"\x1f\x8b this is not a manifest";
    let junk_hash = blake3::hash(junk).to_hex().to_string();
    fs::write(up.path().join("manifests").join(&junk_hash), junk).unwrap();
    fs::write(up.path().join("tags/bad"), format!("{junk_hash}\n")).unwrap();
    for extra in [&[][..], &["--theirs"][..]] {
        let mut args = vec!["pull", "--store", &store_b];
        args.extend_from_slice(extra);
        let bad = format!("{url}:bad");
        args.push(&bad);
        let (code, out) = kcache(&args);
        assert_ne!(code, 0, "{out}");
        assert!(out.contains(&format!("manifest {junk_hash}")), "{out}");
    }
    assert_eq!(fs::read(b.path("conflict_kept")).unwrap(), b"ours");
    assert!(b.path("local_only").exists() && b.path("newfile").exists());

    // --theirs: the snapshot's files replace the conflicting ones, but not a directory
    // against a file.
    let out = kcache_ok(&["pull", "--theirs", "--store", &store_b, &source]);
    assert!(
        out.contains(
            "0 added, 3 updated, 503 unchanged, 0 kept, 1 conflicts skipped, 3 only local"
        ),
        "{out}"
    );
    assert!(out.contains("dir_vs_file"), "{out}");
    assert_eq!(fs::read(b.path("conflict_kept")).unwrap(), b"theirs");
    assert_eq!(fs::read(b.path("conflict_open")).unwrap(), big_theirs);
    assert_eq!(
        fs::read(b.path("conflict_written")).unwrap(),
        b"theirs, over a file being written"
    );
    assert_eq!(fs::read(b.path("dir_vs_file")).unwrap(), b"a file here");
    assert_eq!(fs::read(b.path("local_only")).unwrap(), b"only here");

    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    let made = writer.join().unwrap();
    assert!(made > 0);
    for n in 0..made {
        let got = fs::read(b.path(&format!("work/w{n}"))).unwrap();
        assert!(got == pseudo_random(n, 4096 + n as usize), "work/w{n}");
    }
    // The open reader still reads the file it opened, to the end.
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    assert!(first == big_ours, "the open file changed under its reader");
    // The writer on the replaced name keeps its own file through its handle.
    written.write_all(b", still").unwrap();
    let mut mine = Vec::new();
    written.seek(SeekFrom::Start(0)).unwrap();
    written.read_to_end(&mut mine).unwrap();
    assert_eq!(mine, b"ours, being written, still");
    assert_eq!(written.read_at(&mut [0u8; 4], 0).unwrap(), 4);
    log.write_all(b"after the pulls\n").unwrap();
    drop((held, log, written));
    b.settle();
    assert_eq!(
        fs::read(b.path("log")).unwrap(),
        b"before the pulls\nbetween the pulls\nafter the pulls\n"
    );
    assert_eq!(
        fs::read(b.path("conflict_written")).unwrap(),
        b"theirs, over a file being written"
    );
    let mut b = b;
    b.unmount();
    // Unmounted, the same merge runs in the command's own process: nothing left to change.
    let out = kcache_ok(&["pull", "--theirs", "--store", &store_b, &source]);
    assert!(
        out.contains(
            "0 added, 0 updated, 506 unchanged, 0 kept, 1 conflicts skipped, 3 only local"
        ),
        "{out}"
    );
    let (ok, out) = b.verify();
    assert!(ok, "{out}");
}

/// Polls `f` until it holds or `secs` pass; says what it waited for when it does not.
fn eventually(secs: u64, what: &str, f: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `push=` on machine A and `follow=` on machine B (two stores, one file:// upstream): what A
/// writes appears on B within the intervals; a kill -9 of A's daemon mid-queue loses
/// nothing (A's restart drains the queue); an upstream that is down for a while keeps the
/// queue, counted in `stats`, and it drains once the upstream is back.
#[test]
fn push_on_one_machine_follow_on_another_through_crashes_and_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    let url = format!("file://{}", up.display());
    let push = format!("push={url}:fleet");
    let follow = format!("follow={url}:fleet");
    let Some(mut a) = Mount::with_opts(&[&push, "push_interval=1"]) else {
        return;
    };
    let Some(b) = Mount::with_opts(&[&follow, "follow_interval=1"]) else {
        return;
    };
    let content = |i: usize| format!("file {i} written on machine A\n").repeat(50 + i);
    fs::create_dir(a.path("d")).unwrap();
    for i in 0..5 {
        fs::write(a.path(&format!("d/f{i}")), content(i)).unwrap();
    }
    eventually(20, "A's files on B", &mut || b.path("d/f4").exists());
    for i in 0..5 {
        assert_eq!(
            fs::read_to_string(b.path(&format!("d/f{i}"))).unwrap(),
            content(i)
        );
    }

    // A dies with work queued (and some of it still staged): its restart finishes the job.
    for i in 5..205 {
        fs::write(a.path(&format!("d/f{i}")), content(i)).unwrap();
    }
    a.kill9();
    a.restart_after_crash();
    eventually(40, "all 205 files on B after A's crash", &mut || {
        b.path("d/f204").exists()
            && fs::read_dir(b.path("d")).map(|d| d.count()).unwrap_or(0) == 205
    });
    for i in [5, 100, 204] {
        assert_eq!(
            fs::read_to_string(b.path(&format!("d/f{i}"))).unwrap(),
            content(i)
        );
    }

    // The upstream goes away (a file where its directory was): uploads fail and stay queued.
    let away = dir.path().join("up.away");
    fs::rename(&up, &away).unwrap();
    fs::write(&up, b"not a directory").unwrap();
    for i in 205..215 {
        fs::write(a.path(&format!("d/f{i}")), content(i)).unwrap();
    }
    let sync = |m: &Mount, kind: &str| -> serde_json::Value {
        m.stats()["sync"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} in stats: {}", m.stats()))
    };
    eventually(20, "failed pushes counted with the queue kept", &mut || {
        let s = sync(&a, "push");
        s["errors"].as_u64().unwrap() > 0 && s["queued_blobs"].as_u64().unwrap() >= 10
    });
    assert!(sync(&a, "push")["last_error"].is_string());
    // Back: the queue drains and B gets the rest.
    fs::remove_file(&up).unwrap();
    fs::rename(&away, &up).unwrap();
    eventually(40, "the queue drained", &mut || {
        sync(&a, "push")["queued_blobs"] == 0
    });
    eventually(40, "files written during the outage on B", &mut || {
        b.path("d/f214").exists()
    });
    assert_eq!(fs::read_to_string(b.path("d/f214")).unwrap(), content(214));
    let f = sync(&b, "follow");
    assert!(f["last_ok_ns"].as_i64().unwrap() > 0, "{f}");
    assert!(f["blobs_moved"].as_u64().unwrap() >= 215, "{f}");
    // The same fields with the daemon gone (they are kept in the store).
    let live = sync(&a, "push");
    a.unmount();
    let offline = sync(&a, "push");
    assert_eq!(live["url"], offline["url"]);
    assert_eq!(offline["queued_blobs"], 0);
}

/// `push_sign=` signs what a background push publishes: a store that trusts the key pulls it,
/// one that trusts another key refuses it.
#[test]
fn a_background_push_signs_its_snapshots_with_push_sign() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    kcache_ok(&["keygen", "--out", key.to_str().unwrap()]);
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    let other = dir.path().join("other");
    kcache_ok(&["keygen", "--out", other.to_str().unwrap()]);
    let other_public = fs::read_to_string(other.with_extension("pub")).unwrap();
    let url = format!("file://{}", dir.path().join("up").display());
    let Some(a) = Mount::with_opts(&[
        &format!("push={url}:signed"),
        &format!("push_sign={}", key.display()),
        "push_interval=1",
    ]) else {
        return;
    };
    fs::write(a.path("f"), b"signed content").unwrap();
    eventually(20, "a publish after the write", &mut || {
        a.stats()["sync"][0]["runs"].as_u64().unwrap_or(0) > 0
            && dir.path().join("up/tags/signed").exists()
            && fs::read_to_string(dir.path().join("up/tags/signed"))
                .unwrap()
                .contains(public.trim())
    });
    // Once a.f is in the published snapshot (the first publish may predate the write).
    let pulled = |trust: &str, store: &Path| {
        kcache(&[
            "pull",
            "--store",
            store.to_str().unwrap(),
            "--trusted-key",
            trust.trim(),
            &format!("{url}:signed"),
        ])
    };
    eventually(
        20,
        "the signed snapshot pulled by a store trusting the key",
        &mut || {
            let s = dir.path().join(format!("b{}", rand_suffix()));
            let (code, out) = pulled(&public, &s);
            code == 0 && out.contains("1 files")
        },
    );
    let (code, out) = pulled(&other_public, &dir.path().join("c"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not a trusted key"), "{out}");
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// An emulator on a free loopback port, killed on drop.
struct Emulator(Child);

impl Emulator {
    fn start(mut cmd: Command, port: u16, name: &str) -> Emulator {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let mut em = Emulator(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = em.0.try_wait().unwrap() {
                panic!("{name} exited: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        em
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Azurite's well-known development account.
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[test]
fn gs_and_az_push_from_a_mounted_store_pull_and_fetch_lazily() {
    let Some(py) = venv_python() else { return };
    let azurite = workspace().join(".ci/azurite/node_modules/.bin/azurite-blob");
    if !azurite.exists() {
        assert!(
            std::env::var_os("REQUIRE_FUSE").is_none(),
            "no Azurite at {} (.ci/run installs it)",
            azurite.display()
        );
        eprintln!("skipping: no Azurite at {}", azurite.display());
        return;
    }
    let Some(a) = Mount::new() else { return };
    fs::create_dir(a.path("d")).unwrap();
    fs::write(a.path("d/big"), pseudo_random(3, 3 << 20)).unwrap();
    fs::write(a.path("small"), b"hello over object stores").unwrap();
    a.settle();
    let store_a = a.store.to_str().unwrap().to_owned();
    let want = tree(&a.path(""));

    let gs_port = loopback_port();
    let mut cmd = Command::new(&py);
    cmd.arg(workspace().join("tests/py/gcs_emulator.py")).args([
        "127.0.0.1",
        &gs_port.to_string(),
        "kcachetest",
    ]);
    let _gcs = Emulator::start(cmd, gs_port, "gcp-storage-emulator");
    let az_dir = tempfile::tempdir().unwrap();
    let az_port = loopback_port();
    let mut cmd = Command::new(&azurite);
    cmd.args([
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        &az_port.to_string(),
    ])
    .arg("--location")
    .arg(az_dir.path())
    .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"]);
    let _az = Emulator::start(cmd, az_port, "Azurite");
    let endpoint = format!("http://127.0.0.1:{az_port}/{AZ_ACCOUNT}");
    // Azurite starts with no container: one Shared Key signed PUT makes it.
    let script = r#"
import base64, hashlib, hmac, sys, urllib.parse, urllib.request
from email.utils import formatdate
endpoint, account, key, container = sys.argv[1:5]
date, ver = formatdate(usegmt=True), "2021-08-06"
resource = f"/{account}{urllib.parse.urlparse(endpoint).path}/{container}\nrestype:container"
sts = "PUT\n\n\n\n\napplication/octet-stream\n\n\n\n\n\n\n" + f"x-ms-date:{date}\nx-ms-version:{ver}\n" + resource
sig = base64.b64encode(hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"{endpoint}/{container}?restype=container", method="PUT", data=b"",
    headers={"Content-Type": "application/octet-stream", "x-ms-date": date, "x-ms-version": ver,
             "Authorization": f"SharedKey {account}:{sig}"})
urllib.request.urlopen(req)
"#;
    let out = Command::new(&py)
        .args(["-c", script, &endpoint, AZ_ACCOUNT, AZ_KEY, "kcachetest"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cs = format!(
        "DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};BlobEndpoint={endpoint};"
    );
    let gs_host = format!("127.0.0.1:{gs_port}");

    for (url, var, value) in [
        ("gs://kcachetest/team", "STORAGE_EMULATOR_HOST", &gs_host),
        (
            "az://kcachetest/team",
            "AZURE_STORAGE_CONNECTION_STRING",
            &cs,
        ),
    ] {
        // Store A is mounted: its daemon pushes, with the settings this command hands it.
        let env = [(var, &value[..])];
        let (code, out) = kcache_env(&["push", "--store", &store_a, url, "--tag", "ci"], &env);
        assert_eq!(code, 0, "push to {url}: {out}");
        let dir = tempfile::tempdir().unwrap();
        let store_b = dir.path().join("store");
        let (code, out) = kcache_env(
            &[
                "pull",
                "--store",
                store_b.to_str().unwrap(),
                &format!("{url}:ci"),
            ],
            &env,
        );
        assert!(
            code == 0 && out.contains("to fetch on first open"),
            "{url}: {out}"
        );
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        // The mount's daemon fetches with its own environment: the mount command's.
        let (code, out) = kcache_env(
            &[
                "mount",
                "--store",
                store_b.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ],
            &env,
        );
        assert_eq!(code, 0, "mount: {out}");
        assert_eq!(tree(&mnt), want, "pulled from {url}");
        kcache_ok(&["umount", mnt.to_str().unwrap()]);
    }
}
