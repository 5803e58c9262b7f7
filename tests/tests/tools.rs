//! Real tools on a real mount: pip and huggingface_hub using it as their cache, the pjdfstest
//! POSIX conformance suite and the fsx data-integrity exerciser, in both I/O modes; the metrics
//! endpoint, and the Grafana dashboard's queries against it.

use std::path::Path;
use std::process::Command;

use kcache_tests::{kcache_bin, kcache_ok, venv_python, workspace, Mount};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawning test tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn pip_installs_twice_and_the_second_run_uses_the_cache() {
    let Some(py) = venv_python() else { return };
    let Some(m) = Mount::new() else { return };
    let cache = m.path("pip");
    std::fs::create_dir(&cache).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/pip_cache_check.py"))
        .arg(&cache)
        .arg(work.path()));
    assert!(out.contains("pip cache check: ok"), "{out}");
}

#[test]
fn huggingface_hub_cache_with_symlinks_locks_and_dedup() {
    let Some(py) = venv_python() else { return };
    let Some(mut m) = Mount::new() else { return };
    let cache = m.path("hf");
    std::fs::create_dir(&cache).unwrap();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/hf_check.py"))
        .arg(&cache));
    assert!(out.contains("hf check: ok"), "{out}");
    let shared: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("shared-bytes: "))
        .expect("shared-bytes line")
        .trim()
        .parse()
        .unwrap();
    let blobs: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("shared-blob: "))
        .collect();
    assert_eq!(blobs.len(), 2, "{out}");
    assert_ne!(blobs[0], blobs[1]);
    // The byte-identical file of two repos is stored once.
    m.settle();
    let s = m.stats();
    assert!(s["dedup_saved_bytes"].as_u64().unwrap() >= shared, "{s}");
    // Everything is still there, offline, after a remount.
    m.remount();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/hf_check.py"))
        .arg(&cache)
        .arg("--offline-only"));
    assert!(out.contains("hf check: ok"), "{out}");
}

#[test]
fn after_eviction_pip_downloads_again_and_huggingface_hub_reports_not_found() {
    let Some(py) = venv_python() else { return };
    let Some(m) = Mount::new() else { return };
    let mnt = m.mnt.to_str().unwrap().to_owned();
    // huggingface_hub fills its cache, then everything is evicted.
    let hf = m.path("hf");
    std::fs::create_dir(&hf).unwrap();
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/hf_check.py"))
        .arg(&hf));
    assert!(out.contains("hf check: ok"), "{out}");
    m.settle();
    kcache_ok(&["evict", &mnt, "--to", "0"]);
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/hf_check.py"))
        .arg(&hf)
        .arg("--evicted"));
    assert!(out.contains("hf check: ok"), "{out}");
    assert_eq!(
        out.matches(": not found (LocalEntryNotFoundError)").count(),
        3,
        "{out}"
    );

    // pip's cache is evicted between two installs: the second one downloads again.
    let cache = m.path("pip");
    std::fs::create_dir(&cache).unwrap();
    let work = tempfile::tempdir().unwrap();
    let evict = format!("'{}' evict '{mnt}' --to 0", kcache_bin().display());
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/pip_cache_check.py"))
        .arg(&cache)
        .arg(work.path())
        .arg("--evict-between")
        .arg(&evict));
    assert!(out.contains("downloaded 3 wheels again"), "{out}");
    assert!(out.contains("pip cache check: ok"), "{out}");
}

/// A GET of http://addr/path with a bare std TCP client.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Every file, symlink and directory under `root` with its mode, mtime and content hash.
fn tree(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                kcache_tests::hash_file(&p).to_string()
            };
            out.push(format!("{rel} {:o} {} {what}", m.mode(), m.mtime()));
        }
    }
    out.sort();
    out
}

#[test]
fn import_of_a_real_pip_cache_dedups_and_metrics_count_it() {
    let Some(py) = venv_python() else { return };
    // A real pip cache, made by real pip installs into a plain directory.
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let pip_cache = src.path().join("pip");
    let out = run(Command::new(&py)
        .arg(workspace().join("tests/py/pip_cache_check.py"))
        .arg(&pip_cache)
        .arg(work.path()));
    assert!(out.contains("pip cache check: ok"), "{out}");
    // A symlink and a hard link, as other caches have them.
    std::os::unix::fs::symlink("http-v2", pip_cache.join("link-to-http")).unwrap();
    let some_file = walk_first_file(&pip_cache.join("http-v2"));
    std::fs::hard_link(&some_file, pip_cache.join("hard-link")).unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let Some(m) = Mount::with_opts(&[&format!("metrics={addr}")]) else {
        return;
    };
    let dest = m.path("imported/pip");
    let out = kcache_ok(&[
        "import",
        pip_cache.to_str().unwrap(),
        dest.to_str().unwrap(),
    ]);
    assert!(out.contains("1 hard links"), "{out}");
    assert_eq!(tree(&pip_cache), tree(&dest));
    m.settle();
    let first = m.stats();
    let out = kcache_ok(&[
        "import",
        pip_cache.to_str().unwrap(),
        dest.to_str().unwrap(),
    ]);
    assert!(out.contains("imported 0 files (0 B)"), "{out}");
    m.settle();
    let second = m.stats();
    assert_eq!(first["usage_bytes"], second["usage_bytes"], "{second}");
    assert_eq!(first["blobs"], second["blobs"], "{second}");
    // Imported twice into another directory: stored once.
    kcache_ok(&[
        "import",
        pip_cache.to_str().unwrap(),
        m.path("again").to_str().unwrap(),
    ]);
    m.settle();
    let third = m.stats();
    assert_eq!(first["usage_bytes"], third["usage_bytes"], "{third}");
    assert!(
        third["dedup_saved_bytes"].as_u64().unwrap() >= first["logical_bytes"].as_u64().unwrap()
    );
    // Reading an imported file shows in the counters and in the metrics.
    std::fs::read(walk_first_file(&dest.join("http-v2"))).unwrap();
    let s = m.stats();
    let text = http_get(&addr, "/metrics");
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
    assert_eq!(
        metric(&text, "kcache_usage_bytes"),
        s["usage_bytes"].as_u64().unwrap()
    );
    assert_eq!(metric(&text, "kcache_blobs"), s["blobs"].as_u64().unwrap());
    assert!(metric(&text, "kcache_opens_total") >= 1);
    assert!(
        metric(&text, "kcache_written_bytes_total") >= first["logical_bytes"].as_u64().unwrap()
    );
    assert!(
        s["opens"].as_u64().unwrap() >= 1 && s["bytes_written"].as_u64().unwrap() > 0,
        "{s}"
    );
    // The FUSE requests the import and the read cost, by kind: at least a create and a
    // write per imported file, and the open of the read above.
    let kind = |op: &str| metric(&text, &format!("kcache_fuse_requests_total{{op=\"{op}\"}}"));
    let files = first["files"].as_u64().unwrap();
    assert!(kind("create") >= files, "creates < {files} files:\n{text}");
    assert!(kind("write") >= 1 && kind("open") >= 1, "{text}");
    assert!(http_get(&addr, "/other").contains(" 404 "));
}

/// The metric names a PromQL expression reads: its identifiers less functions (followed by
/// `(`), keywords and aggregations, label names (inside `{}`, and the lists after `by`, `on`,
/// ...), ranges in `[]`, numbers, durations and strings.
fn promql_metric_names(expr: &str) -> Vec<String> {
    // Keywords and aggregation operators (`sum by (l) (x)`: no parenthesis right after).
    const KEYWORDS: &str = "and or unless bool offset atan2 inf nan sum min max avg group \
        stddev stdvar count count_values bottomk topk quantile limitk limit_ratio";
    const GROUPING: &str = "by without on ignoring group_left group_right";
    let is = |list: &str, w: &str| list.split_whitespace().any(|k| k == w);
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b':' | b'$');
    let (mut i, mut depth, mut names) = (0, 0usize, Vec::new());
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' && q != b'`' { 2 } else { 1 };
                }
                i += 1;
            }
            b'{' | b'[' => (depth, i) = (depth + 1, i + 1),
            b'}' | b']' => (depth, i) = (depth.saturating_sub(1), i + 1),
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let rest = expr[i..].trim_start();
                // Numbers and durations start with a digit, Grafana variables with `$`.
                if depth > 0 || !(c.is_ascii_alphabetic() || c == b'_' || c == b':') {
                    continue;
                }
                if is(GROUPING, word) {
                    if rest.starts_with('(') {
                        let open = expr.len() - rest.len();
                        i = open + rest.find(')').map_or(rest.len(), |p| p + 1);
                    }
                } else if !is(KEYWORDS, word) && !rest.starts_with('(') {
                    names.push(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn grafana_dashboard_queries_only_metrics_a_mount_serves() {
    assert_eq!(
        promql_metric_names(
            r#"sum by (instance) (rate(a_total{x=~"y}", z="$v"}[$__rate_interval])) / on(instance) group_left(k) b offset 1h > 0.5e3"#
        ),
        ["a_total", "b"]
    );
    let path = workspace().join("mountd/dashboards/kcache.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Data source chosen by a template variable, which every panel and query uses.
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable in {}",
        path.display()
    );
    let uses_variable = |v: &serde_json::Value| v["datasource"]["uid"] == "${datasource}";
    // (where, expression) of every query: panels, panels inside collapsed rows, and variables
    // (label_values(METRIC, label) reads METRIC).
    let mut queries: Vec<(String, String)> = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(uses_variable(v), "variable {}: {v}", v["name"]);
        let def = v["definition"].as_str().unwrap();
        let metric = def
            .strip_prefix("label_values(")
            .and_then(|r| r.split(',').next())
            .unwrap_or_else(|| panic!("variable {}: {def}", v["name"]));
        queries.push((format!("variable {}", v["name"]), metric.to_string()));
    }
    let mut panels: Vec<&serde_json::Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        if p["type"] == "row" || p["type"] == "text" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(
            uses_variable(p) && !targets.is_empty(),
            "panel {title:?}: {p}"
        );
        for t in targets {
            assert!(uses_variable(t), "panel {title:?}: {t}");
            let expr = t["expr"].as_str().unwrap();
            queries.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    // With a background push and follow, so that their series exist too.
    let up = tempfile::tempdir().unwrap();
    let url = format!("file://{}", up.path().display());
    let Some(m) = Mount::with_opts(&[
        &format!("metrics={addr}"),
        &format!("push={url}:dash"),
        &format!("follow={url}:dash"),
        "push_interval=1",
        "follow_interval=1",
    ]) else {
        return;
    };
    std::fs::write(m.path("f"), b"counted").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while m.stats()["sync"].as_array().map_or(0, |s| s.len()) < 2
        || m.stats()["sync"][0]["last_ok_ns"].is_null()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no push/follow runs recorded: {}",
            m.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let text = http_get(&addr, "/metrics");
    let body = text.split_once("\r\n\r\n").map_or(&text[..], |(_, b)| b);
    // Sample names, which is what Prometheus stores and queries name: a counter's carry
    // `_total`, a histogram's `_bucket`, `_sum` and `_count` (the `# TYPE` line has neither).
    let served: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    assert!(served.contains("kcache_usage_bytes"), "{text}");
    for (place, expr) in &queries {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr:?}");
        for n in names {
            assert!(
                served.contains(n.as_str()),
                "{place} queries {n}, which a mount does not serve ({expr:?}); served: {served:?}"
            );
        }
    }
}

fn walk_first_file(dir: &Path) -> std::path::PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                return p;
            }
        }
    }
    panic!("no file under {}", dir.display());
}

/// The runner scripts install their tool on first use and write to one output directory, so
/// the two conformance runs take turns.
static CONFORMANCE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn conformance(opts: &[&str]) {
    let _turn = CONFORMANCE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(m) = Mount::with_opts(opts) else {
        return;
    };
    // pjdfstest switches to unprivileged users, who must be able to enter the mount.
    std::fs::set_permissions(&m.mnt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ci = workspace().join(".ci");
    // A generous pause between timestamp checks: a loaded CI machine must not turn a
    // timestamp comparison into a coin toss.
    let out = run(Command::new("bash")
        .env("PJDFSTEST_NAPTIME", "0.1")
        .arg(ci.join("pjdfstest.sh"))
        .arg(&m.mnt)
        .arg(workspace().join("tests/pjdfstest-expected-failures.txt")));
    assert!(out.contains("pjdfstest: OK"), "{out}");
    let out = run(Command::new("bash").arg(ci.join("fsx.sh")).arg(&m.mnt));
    assert!(out.contains("fsx: OK"), "{out}");
    assert!(Path::new(&m.mnt).exists());
}

#[test]
fn pjdfstest_and_fsx_passthrough() {
    conformance(&["allow_other"]);
}

#[test]
fn pjdfstest_and_fsx_daemon_io() {
    conformance(&["allow_other", "nopassthrough"]);
}
