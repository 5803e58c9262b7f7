//! `kcache mount --metrics ADDR`: Prometheus metrics over HTTP on `/metrics`, built at each
//! scrape from the store's counters (prometheus-client does the exposition format).

use std::sync::Arc;

use anyhow::{anyhow, Result};
use kcache_fs::KcacheFs;
use kcache_store::Store;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Starts the HTTP server on a thread of its own.
pub fn serve(addr: &str, fs: Arc<KcacheFs>, reader: Arc<Store>) -> Result<()> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| anyhow!("serving metrics on {addr}: {e}"))?;
    tracing::info!(addr, "serving metrics on /metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    match render(&fs, &reader) {
                        Ok(body) => tiny_http::Response::from_string(body).with_header(
                            tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                            )
                            .expect("static header is valid"),
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, "collecting metrics failed");
                            tiny_http::Response::from_string(format!("error: {e}\n"))
                                .with_status_code(500)
                        }
                    }
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
}

/// The metrics text. Reads go through `reader` (a read-only connection), so a scrape never
/// holds up the filesystem's database connection.
pub fn render(fs: &KcacheFs, reader: &Store) -> Result<String> {
    let halted = fs.store().halted().is_some();
    fs.store().lru().flush_accesses()?;
    // As of now for the read-only connection, not as of the last group commit.
    fs.store().commit_group()?;
    let st = reader.stats()?;
    let usage = fs
        .usage()
        .map_err(|e| anyhow!("reading usage: errno {}", e.0))?;
    let mut reg = Registry::with_prefix("kcache");
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        reg.register(name, help, ConstGauge::new(v as i64));
    };
    gauge(
        &mut reg,
        "usage_bytes",
        "Bytes of blobs stored on local disk",
        st.usage_bytes,
    );
    gauge(
        &mut reg,
        "quota_bytes",
        "Quota on stored bytes (0: none)",
        st.quota_bytes.unwrap_or(0),
    );
    gauge(
        &mut reg,
        "low_watermark_bytes",
        "Eviction stops at this many stored bytes (0: no quota)",
        st.low_watermark_bytes.unwrap_or(0),
    );
    gauge(
        &mut reg,
        "disk_available_bytes",
        "Free space on the store's disk",
        usage.disk_available,
    );
    gauge(
        &mut reg,
        "min_free_bytes",
        "Free space kept on the store's disk",
        usage.min_free,
    );
    gauge(
        &mut reg,
        "pinned_bytes",
        "Bytes of pinned blobs",
        st.pinned_bytes,
    );
    gauge(
        &mut reg,
        "halted",
        "1 when the store stopped taking changes (its database rolled back acknowledged ones; remount to recover)",
        halted as u64,
    );
    gauge(&mut reg, "files", "Files in all volumes", st.files);
    gauge(&mut reg, "blobs", "Distinct contents stored", st.blobs);
    gauge(
        &mut reg,
        "logical_bytes",
        "Sum of file sizes",
        st.logical_bytes,
    );
    gauge(
        &mut reg,
        "dedup_saved_bytes",
        "Bytes deduplication saves",
        st.dedup_saved_bytes,
    );
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        reg.register(name, help, ConstCounter::new(v));
    };
    counter(&mut reg, "evictions", "Blobs evicted", st.evictions);
    counter(&mut reg, "evicted_bytes", "Bytes evicted", st.evicted_bytes);
    counter(&mut reg, "opens", "Files opened", st.opens);
    counter(
        &mut reg,
        "read_bytes",
        "Bytes read through the daemon (not passthrough reads)",
        st.bytes_read,
    );
    counter(&mut reg, "written_bytes", "Bytes written", st.bytes_written);
    // One series per request kind the kernel has sent (kinds never sent are left out).
    let requests = Family::<Vec<(String, String)>, Counter>::default();
    for (op, n) in fs.requests().snapshot() {
        if n > 0 {
            requests
                .get_or_create(&vec![("op".to_owned(), op.name().to_owned())])
                .inc_by(n);
        }
    }
    // Background push and follow, one series each (labels: kind, volume, upstream, tag).
    let queued = Family::<Vec<(String, String)>, Gauge>::default();
    let moved = Family::<Vec<(String, String)>, Counter>::default();
    let errors = Family::<Vec<(String, String)>, Counter>::default();
    let last_ok = Family::<Vec<(String, String)>, Gauge>::default();
    for s in reader.sync_statuses()? {
        let labels = vec![
            ("kind".to_owned(), format!("{:?}", s.kind).to_lowercase()),
            ("volume".to_owned(), s.volume.clone()),
            ("upstream".to_owned(), s.url.clone()),
            ("tag".to_owned(), s.tag.clone()),
        ];
        queued.get_or_create(&labels).set(s.queued_blobs as i64);
        moved.get_or_create(&labels).inc_by(s.bytes_moved);
        errors.get_or_create(&labels).inc_by(s.errors);
        last_ok
            .get_or_create(&labels)
            .set(s.last_ok_ns.map_or(0, |t| t / 1_000_000_000));
    }
    reg.register(
        "sync_queued_blobs",
        "Blobs a background push still has to upload",
        queued,
    );
    reg.register(
        "sync_uploaded_bytes",
        "Bytes a background push uploaded",
        moved,
    );
    reg.register("sync_errors", "Failed push or follow runs", errors);
    reg.register(
        "sync_last_success_seconds",
        "When a push last published or a follow last merged (Unix time; 0: never)",
        last_ok,
    );
    reg.register(
        "fuse_requests",
        "FUSE requests served, by kind (the FUSE opcode)",
        requests,
    );
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}
