//! Several processes on one mount: locks that exclude and die with their holder, O_EXCL races,
//! concurrent O_APPEND, and an SQLite database shared by two processes.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kcache_tests::{python, python_workers, Mount};

const TRY_FLOCK: &str = r#"
import fcntl, sys
f = open(sys.argv[1], "a")
try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("got")
except BlockingIOError:
    print("busy")
"#;

const TRY_LOCKF: &str = r#"
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
start, length = int(sys.argv[2]), int(sys.argv[3])
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
    print("got")
except OSError:
    print("busy")
"#;

/// Starts a process that takes a lock, says "locked" and then sleeps until killed.
fn hold(code: &str, args: &[&str]) -> std::process::Child {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    child
}

#[test]
fn flock_excludes_and_dies_with_its_holder() {
    let Some(m) = Mount::new() else { return };
    let lock = m.path("x.lock");
    fs::write(&lock, b"").unwrap();
    let lp = lock.to_str().unwrap();
    let mut holder = hold(
        "import fcntl,sys,time\nf=open(sys.argv[1],'a')\nfcntl.flock(f,fcntl.LOCK_EX)\nprint('locked',flush=True)\ntime.sleep(600)",
        &[lp],
    );
    assert_eq!(python(TRY_FLOCK, &[lp]).trim(), "busy");
    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if python(TRY_FLOCK, &[lp]).trim() == "got" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flock not released after its holder was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fcntl_byte_range_locks() {
    let Some(m) = Mount::new() else { return };
    let f = m.path("ranges");
    fs::write(&f, vec![0u8; 100]).unwrap();
    let fp = f.to_str().unwrap();
    let mut holder = hold(
        "import fcntl,os,sys,time\nfd=os.open(sys.argv[1],os.O_RDWR)\nfcntl.lockf(fd,fcntl.LOCK_EX,10,0)\nprint('locked',flush=True)\ntime.sleep(600)",
        &[fp],
    );
    assert_eq!(python(TRY_LOCKF, &[fp, "0", "10"]).trim(), "busy");
    assert_eq!(python(TRY_LOCKF, &[fp, "5", "2"]).trim(), "busy");
    assert_eq!(python(TRY_LOCKF, &[fp, "10", "10"]).trim(), "got");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(python(TRY_LOCKF, &[fp, "0", "10"]).trim(), "got");
}

#[test]
fn o_excl_race_has_exactly_one_winner() {
    let Some(m) = Mount::new() else { return };
    for round in 0..5 {
        let target = m.path(&format!("race{round}"));
        let won = python_workers(
            "import os,sys\ntry:\n  os.close(os.open(sys.argv[1], os.O_CREAT|os.O_EXCL|os.O_WRONLY, 0o600)); print('won')\nexcept FileExistsError:\n  print('lost')",
            &target,
            16,
        )
        .iter()
        .filter(|o| o.trim() == "won")
        .count();
        assert_eq!(won, 1, "round {round}");
    }
}

#[test]
fn concurrent_append_loses_nothing() {
    for opts in [&[][..], &["nopassthrough"][..]] {
        let Some(m) = Mount::with_opts(opts) else {
            return;
        };
        let log = m.path("index.log");
        python_workers(
            "import os,sys\nw=sys.argv[2]\nfd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_APPEND, 0o644)\nfor i in range(200):\n  os.write(fd, f'writer {w} line {i:04d} '.encode() + b'x'*50 + b'\\n')\nos.close(fd)",
            &log,
            8,
        );
        let text = fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1600, "opts {opts:?}");
        let mut seen = std::collections::HashSet::new();
        for l in &lines {
            assert!(
                l.ends_with(&"x".repeat(50)) && l.starts_with("writer "),
                "torn line {l:?}"
            );
            assert!(seen.insert(l.to_string()), "duplicate {l:?}");
        }
    }
}

#[test]
fn sqlite_database_shared_by_two_processes() {
    let Some(m) = Mount::new() else { return };
    let db = m.path("shared.db");
    python(
        "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.execute('create table t(w int, i int)')\nc.commit()",
        &[db.to_str().unwrap()],
    );
    let writer = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1], timeout=60)\nfor i in range(200):\n  c.execute('insert into t values (?,?)', (int(sys.argv[2]), i)); c.commit()";
    python_workers(writer, &db, 2);
    let out = python(
        "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nprint(c.execute('select count(*), count(distinct w*1000+i) from t').fetchone())\nprint(c.execute('pragma integrity_check').fetchone()[0])",
        &[db.to_str().unwrap()],
    );
    assert_eq!(out.trim(), "(400, 400)\nok");
}

/// Regression: the kernel sends `release` after close(2) has returned, so a file's commit can
/// race with the next open of it. Early versions lost writes or gave EIO here: the open read
/// the inode before taking its lock and copied stale content into its staging file, or joined
/// per-inode state that the release was just dropping. Each round writes, closes, and at once
/// reopens the same file (plain write, shared mmap, and a copy of a deduplicated file).
#[test]
fn reopen_right_after_close_sees_the_new_content() {
    const SCRIPT: &str = r#"
import mmap, os, shutil, sys
d, mode = sys.argv[1], sys.argv[2]
bad = []
for i in range(150):
    p = os.path.join(d, f"{mode}{i}")
    with open(p, "wb") as f:
        f.write(b"a" * 10000)
    try:
        if mode == "mmap":
            f = open(p, "r+b"); m = mmap.mmap(f.fileno(), 0); f.close()
            m[0:4] = b"WXYZ"; m.flush(); m.close()
        elif mode == "write":
            with open(p, "r+b") as f:
                f.write(b"WXYZ")
        else:
            q = p + ".copy"; shutil.copyfile(p, q)
            with open(q, "r+b") as f:
                f.write(b"WXYZ")
            p = q
        with open(p, "rb") as f:
            got = f.read()
        if got != b"WXYZ" + b"a" * 9996:
            bad.append((p, got[:8], len(got)))
    except OSError as e:
        bad.append((p, str(e)))
print(bad)
"#;
    for opts in [&[][..], &["nopassthrough"][..]] {
        let Some(m) = Mount::with_opts(opts) else {
            return;
        };
        for mode in ["write", "mmap", "copy"] {
            let out = python(SCRIPT, &[m.mnt.to_str().unwrap(), mode]);
            assert_eq!(out.trim(), "[]", "{mode} {opts:?}");
        }
    }
}

/// A file that readers hold open (served by kernel passthrough, which the kernel lets no
/// other kind of handle join) can still be opened for writing: the writer waits for the
/// readers to close rather than failing, as an append to an npm cacache index bucket that
/// another process is reading does. Readers always see one whole version.
#[test]
fn a_writer_waits_out_readers_held_by_passthrough_and_readers_see_whole_versions() {
    use std::io::{Read, Write};
    let Some(m) = Mount::new() else { return };
    let path = m.path("bucket");
    fs::write(&path, b"line 0\n").unwrap();
    // Committed first (the kernel releases asynchronously): only committed content is
    // served by passthrough.
    m.settle();
    // One reader in the middle of a read while a writer comes.
    let mut reader = fs::File::open(&path).unwrap();
    let mut head = [0u8; 4];
    reader.read_exact(&mut head).unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!([&head[..], &rest].concat(), b"line 0\n");
    });
    let t = Instant::now();
    let mut w = fs::OpenOptions::new().append(true).open(&path).unwrap();
    w.write_all(b"line 1\n").unwrap();
    drop(w);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "the writer did not wait for the reader ({:?}): the reader was not passthrough, so this tests nothing",
        t.elapsed()
    );
    closer.join().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"line 0\nline 1\n");

    // Readers in a loop and an appender: every append lands, every read is a whole version.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = fs::read(&path).unwrap();
                    let text = String::from_utf8(got).unwrap();
                    for (i, l) in text.lines().enumerate() {
                        assert_eq!(l, format!("line {i}"), "torn read: {text:?}");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 2..40 {
        let mut w = fs::OpenOptions::new().append(true).open(&path).unwrap();
        // One write per line: a reader may see each write as it lands, as on any filesystem.
        w.write_all(format!("line {i}\n").as_bytes()).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 40, "{text}");
}

/// A file extended by a truncate by path while a reader holds it through passthrough: a new
/// reader does not join the old passthrough (which would show the old content, ending at the
/// old length), it waits for it to end and then reads what the file holds now.
#[test]
fn a_reader_after_a_truncate_by_path_never_sees_the_old_content() {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    let Some(m) = Mount::new() else { return };
    let path = m.path("t");
    fs::write(&path, b"old content").unwrap();
    m.settle();
    let mut old_reader = fs::File::open(&path).unwrap();
    let mut first = [0u8; 3];
    old_reader.read_exact(&mut first).unwrap();
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 20) }, 0);
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(old_reader);
    });
    let t = Instant::now();
    let now = fs::read(&path).unwrap();
    let mut want = b"old content".to_vec();
    want.resize(20, 0);
    assert_eq!(now, want, "a new reader saw {now:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "the new reader did not wait ({:?}): the old reader was not passthrough",
        t.elapsed()
    );
    closer.join().unwrap();
}

/// Readers looping over a file that appenders extend, many rounds, each starting from a
/// reader held through passthrough (the mode changes it forces are where reads tore: a
/// reader's open dropped the kernel's pages while an append copied into them was still on
/// its way to the daemon, and the page read back came short, zero-filled up to the new size).
#[test]
fn readers_racing_appenders_never_see_zeros_or_lose_lines() {
    use std::io::{Read, Write};
    let Some(m) = Mount::new() else { return };
    for round in 0..40 {
        let path = m.path(&format!("race-{round}"));
        fs::write(&path, b"line 0\n").unwrap();
        m.settle();
        let mut held = fs::File::open(&path).unwrap();
        let mut head = [0u8; 4];
        held.read_exact(&mut head).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let got = fs::read(&path).unwrap();
                        let text = String::from_utf8(got).unwrap();
                        for (i, l) in text.lines().enumerate() {
                            assert_eq!(
                                l,
                                format!("line {i}"),
                                "round {round}, torn read: {text:?}"
                            );
                        }
                    }
                })
            })
            .collect();
        for i in 1..30 {
            let mut w = fs::OpenOptions::new().append(true).open(&path).unwrap();
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        closer.join().unwrap();
        for r in readers {
            r.join().unwrap();
        }
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 30, "round {round}: {text}");
    }
}
