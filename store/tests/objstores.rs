//! `gs://` and `az://` upstreams against emulators on loopback: gcp-storage-emulator (from
//! the pinned test venv) for Google Cloud Storage and Azurite (installed by .ci/run into
//! .ci/azurite) for Azure Blob. For each: the client's reads, writes, lists and conditional
//! puts; a push, a pull into another store and a lazy fetch of a blob; and, where the
//! emulator honours conditional writes, four concurrent pushers to one tag.
//!
//! Each is skipped when its emulator is missing, except under REQUIRE_FUSE=1 (CI), where
//! that fails. Settings go to `Upstream::parse_with` as an explicit environment, so nothing
//! here depends on (or changes) this process's.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kcache_store::objstore::{ObjError, ObjStore};
use kcache_store::{Kind, Remote, Store, Upstream};

mod common;

// No '-': object_store percent-encodes it in the XML API path, which gcp-storage-emulator
// does not decode before matching bucket names.
const BUCKET: &str = "kcachetest";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn required() -> bool {
    std::env::var_os("REQUIRE_FUSE").is_some()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An emulator process, killed on drop.
struct Emulator {
    child: Child,
    log: PathBuf,
}

impl Emulator {
    fn start(mut cmd: Command, log: PathBuf, port: u16, name: &str) -> Emulator {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let mut em = Emulator { child, log };
        let start = Instant::now();
        loop {
            if let Some(status) = em.child.try_wait().unwrap() {
                panic!("{name} exited ({status}): {}", em.log_text());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} did not listen within 60 s: {}",
                em.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{name} listening after {:?}", start.elapsed());
        em
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn read_all(s: &ObjStore, key: &str, range: Option<(u64, Option<u64>)>) -> Vec<u8> {
    let mut out = Vec::new();
    s.get(key, range).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// Reads, writes, lists and misses through the client.
fn client_basics(s: &ObjStore) {
    s.put_bytes("blobs/ab/one", b"0123456789").unwrap();
    assert_eq!(read_all(s, "blobs/ab/one", None), b"0123456789");
    assert_eq!(read_all(s, "blobs/ab/one", Some((3, Some(7)))), b"3456");
    assert_eq!(read_all(s, "blobs/ab/one", Some((8, None))), b"89");
    assert!(s.head("blobs/ab/one").unwrap());
    assert!(!s.head("blobs/ab/nope").unwrap());
    assert!(matches!(
        s.get("blobs/ab/nope", None),
        Err(ObjError::Missing)
    ));
    s.put_bytes("blobs/cd/two", b"x").unwrap();
    let mut keys = s.list("blobs/").unwrap();
    keys.sort();
    assert_eq!(keys, ["blobs/ab/one", "blobs/cd/two"]);
    assert!(s.list("manifests/").unwrap().is_empty());
    assert!(s.get_versioned("tags/none").unwrap().is_none());
}

/// Conditional puts, which tag updates rely on: create only if absent, replace only the
/// version read.
fn conditional_puts(s: &ObjStore) {
    assert!(s.put_if("tags/cas", b"one", None).unwrap());
    assert!(
        !s.put_if("tags/cas", b"two", None).unwrap(),
        "created twice"
    );
    let (got, v) = s.get_versioned("tags/cas").unwrap().unwrap();
    assert_eq!(got, b"one");
    assert!(s.put_if("tags/cas", b"two", Some(&v)).unwrap());
    assert!(
        !s.put_if("tags/cas", b"three", Some(&v)).unwrap(),
        "a stale version won"
    );
    assert_eq!(read_all(s, "tags/cas", None), b"two");
}

/// A push of a small volume, a pull of it into another store, and a lazy fetch of a blob.
fn push_pull_fetch(up: &Upstream, dir: &Path) {
    let a = Store::open(&dir.join("a")).unwrap();
    let v = a.volume("default", true, 0, 0).unwrap();
    let d = a
        .ns()
        .create(v.root, b"dir", &common::node(Kind::Dir))
        .unwrap();
    let f = a
        .ns()
        .create(d.ino, b"file", &common::node(Kind::File))
        .unwrap();
    common::commit(&a, f.ino, b"hello from the emulator");
    let g = a
        .ns()
        .create(v.root, b"g", &common::node(Kind::File))
        .unwrap();
    common::commit(&a, g.ino, &vec![7u8; 300_000]);
    a.push(up, "default", "t", None, &mut |_| {}).unwrap();

    let b = Arc::new(Store::open(&dir.join("b")).unwrap());
    let remote = Arc::new(Remote::new(vec![up.clone()], Default::default()).unwrap());
    b.pull(&remote, "t", "default", &[]).unwrap();
    let root = b.volume("default", false, 0, 0).unwrap().root;
    let d = b.ns().lookup(root, b"dir").unwrap();
    let f = b.ns().lookup(d.ino, b"file").unwrap();
    let h = f.blob.unwrap();
    assert!(b.is_remote_only(&h), "a pull fetches no blob");
    assert!(b.ensure_local(&h, &remote, &|| true).unwrap());
    assert!(!b.is_remote_only(&h));
    let mut got = Vec::new();
    b.blobs()
        .open_blob(&h)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, b"hello from the emulator");
    let g = b.ns().lookup(root, b"g").unwrap().blob.unwrap();
    assert!(b.ensure_local(&g, &remote, &|| true).unwrap());
    assert_eq!(
        std::fs::metadata(b.blobs().blob_path(&g)).unwrap().len(),
        300_000
    );
    assert!(b.blobs().verify(|_, _| {}).unwrap().is_clean());
}

/// A store nothing listens for: each request fails as worth another try, in time.
fn unreachable_is_transient(up: &Upstream) {
    let Upstream::Object(s) = up else {
        unreachable!()
    };
    let t = Instant::now();
    match s.get("tags/t", None) {
        Err(ObjError::Transient(m)) => eprintln!("get from nothing: {:?}: {m}", t.elapsed()),
        Err(e) => panic!("get from nothing: {e:?}"),
        Ok(_) => panic!("get from nothing succeeded"),
    }
    assert!(matches!(
        s.put_bytes("tags/t", b"x"),
        Err(ObjError::Transient(_))
    ));
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// The pinned test venv's Python, if it has gcp-storage-emulator.
fn gcs_python() -> Option<PathBuf> {
    let p = std::env::var_os("KCACHE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv-test/bin/python"));
    let ok = p.exists()
        && Command::new(&p)
            .args(["-c", "import gcp_storage_emulator"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(p);
    }
    assert!(
        !required(),
        "test venv {} is missing or has no gcp-storage-emulator (pip install -r tests/py/requirements.txt)",
        p.display()
    );
    eprintln!("skipping: no gcp-storage-emulator in {}", p.display());
    None
}

#[test]
fn gs_against_gcp_storage_emulator() {
    let Some(python) = gcs_python() else { return };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The emulator with what its XML API lacks added (see the script).
    let mut cmd = Command::new(&python);
    cmd.arg(workspace().join("tests/py/gcs_emulator.py")).args([
        "127.0.0.1",
        &port.to_string(),
        BUCKET,
    ]);
    let _em = Emulator::start(
        cmd,
        dir.path().join("gcs.log"),
        port,
        "gcp-storage-emulator",
    );
    let e = env(&[
        ("STORAGE_EMULATOR_HOST", &format!("127.0.0.1:{port}")),
        ("HOME", dir.path().to_str().unwrap()),
    ]);
    let timeout = Duration::from_secs(10);
    let up = Upstream::parse_with(&format!("gs://{BUCKET}/kc"), timeout, Some(&e)).unwrap();
    let Upstream::Object(s) = &up else {
        panic!("gs:// is an object store")
    };
    assert_eq!(up.to_string(), format!("gs://{BUCKET}/kc"));
    client_basics(s);
    conditional_puts(s);
    push_pull_fetch(&up, dir.path());
    for round in 0..2 {
        common::four_pushers_one_tag(&up, &format!("fleet-{round}"), [0, 40][round]);
    }
    // A bucket that does not exist is not a missing object.
    let none = Upstream::parse_with("gs://nosuchbucket", timeout, Some(&e)).unwrap();
    let Upstream::Object(none) = &none else {
        unreachable!()
    };
    match none.list("blobs/") {
        Err(ObjError::Fatal(m)) => assert!(m.contains("nosuchbucket"), "{m}"),
        other => panic!("list in a missing bucket: {other:?}"),
    }
    let dead = env(&[(
        "STORAGE_EMULATOR_HOST",
        &format!("127.0.0.1:{}", free_port()),
    )]);
    let short = Duration::from_secs(2);
    unreachable_is_transient(&Upstream::parse_with("gs://b", short, Some(&dead)).unwrap());
    eprintln!("gs:// done after {:?}", t0.elapsed());
}

/// Azurite's blob server, if installed (by .ci/run, into .ci/azurite).
fn azurite() -> Option<PathBuf> {
    let p = std::env::var_os("KCACHE_TEST_AZURITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".ci/azurite/node_modules/.bin/azurite-blob"));
    if p.exists() {
        return Some(p);
    }
    assert!(
        !required(),
        "no Azurite at {} (.ci/run installs it: npm ci --prefix .ci/azurite)",
        p.display()
    );
    eprintln!("skipping: no Azurite at {}", p.display());
    None
}

/// Azurite's well-known development account.
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Creates a container (Azurite starts with none; object_store has no call for it): a
/// Shared Key signed PUT, by Python's standard library.
fn create_container(endpoint: &str, container: &str) {
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
    let out = Command::new("python3")
        .args(["-c", script, endpoint, DEV_ACCOUNT, DEV_KEY, container])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "creating container {container}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn az_against_azurite() {
    let Some(azurite) = azurite() else { return };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("azurite");
    std::fs::create_dir(&ws).unwrap();
    let port = free_port();
    let mut cmd = Command::new(&azurite);
    cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .arg("--location")
        .arg(&ws)
        .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"]);
    let _em = Emulator::start(cmd, dir.path().join("azurite.log"), port, "Azurite");
    let endpoint = format!("http://127.0.0.1:{port}/{DEV_ACCOUNT}");
    create_container(&endpoint, BUCKET);
    let cs = format!(
        "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};BlobEndpoint={endpoint};"
    );
    let e = env(&[
        ("AZURE_STORAGE_CONNECTION_STRING", &cs),
        ("HOME", dir.path().to_str().unwrap()),
    ]);
    let timeout = Duration::from_secs(10);
    let up = Upstream::parse_with(&format!("az://{BUCKET}/kc"), timeout, Some(&e)).unwrap();
    let Upstream::Object(s) = &up else {
        panic!("az:// is an object store")
    };
    assert_eq!(up.to_string(), format!("az://{BUCKET}/kc"));
    client_basics(s);
    conditional_puts(s);
    // Over 16 MiB goes up in parts (block blobs); gcp-storage-emulator has no XML multipart
    // uploads, so this is Azurite's alone.
    let big: Vec<u8> = (0..17u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = dir.path().join("big");
    std::fs::write(&file, &big).unwrap();
    s.put_file("blobs/ee/big", &file).unwrap();
    assert!(
        read_all(s, "blobs/ee/big", None) == big,
        "a multipart object reads back whole"
    );
    assert_eq!(
        read_all(s, "blobs/ee/big", Some((9 << 20, Some((9 << 20) + 5)))),
        &big[9 << 20..(9 << 20) + 5]
    );
    push_pull_fetch(&up, dir.path());
    for round in 0..2 {
        common::four_pushers_one_tag(&up, &format!("fleet-{round}"), [0, 40][round]);
    }

    // A container that does not exist is not a missing object.
    let none = Upstream::parse_with("az://no-such-container", timeout, Some(&e)).unwrap();
    let Upstream::Object(none) = &none else {
        unreachable!()
    };
    match none.list("blobs/") {
        Err(ObjError::Fatal(m)) => assert!(m.contains("no-such-container"), "{m}"),
        other => panic!("list in a missing container: {other:?}"),
    }
    // A wrong key is refused, with the store's message.
    let bad = env(&[(
        "AZURE_STORAGE_CONNECTION_STRING",
        &cs.replace(DEV_KEY, "a2V5a2V5a2V5a2V5"),
    )]);
    let up = Upstream::parse_with(&format!("az://{BUCKET}"), timeout, Some(&bad)).unwrap();
    let Upstream::Object(wrong) = &up else {
        unreachable!()
    };
    match wrong.get("kc/tags/t", None) {
        Err(ObjError::Fatal(m)) => eprintln!("a wrong key: {m}"),
        Err(e) => panic!("a wrong key: {e:?}"),
        Ok(_) => panic!("a wrong key was accepted"),
    }
    let dead = env(&[(
        "AZURE_STORAGE_CONNECTION_STRING",
        &cs.replace(
            &endpoint,
            &format!("http://127.0.0.1:{}/{DEV_ACCOUNT}", free_port()),
        ),
    )]);
    let short = Duration::from_secs(2);
    unreachable_is_transient(&Upstream::parse_with("az://c", short, Some(&dead)).unwrap());
    eprintln!("az:// done after {:?}", t0.elapsed());
}
