//! FUSE requests per file: reads kcache's `kcache_fuse_requests_total` counters from its
//! `/metrics` endpoint between workload phases, so the bench can print how many round trips
//! each file cost in each phase, by kind.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Counts by request kind at one moment.
pub type Counts = BTreeMap<String, u64>;

/// Reads the counters of one kcache daemon.
pub struct Probe {
    addr: String,
}

impl Probe {
    /// A free loopback address for `--metrics`, and the probe that reads it.
    pub fn on_free_port() -> Result<Probe> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let addr = l.local_addr()?.to_string();
        Ok(Probe { addr })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The counters now. A plain HTTP/1.0 GET: one request, read to the end.
    pub fn counts(&self) -> Result<Counts> {
        let mut s = TcpStream::connect(&self.addr)
            .with_context(|| format!("connecting to the metrics at {}", self.addr))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr)?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        if !body.starts_with("HTTP/1.") || !body.contains(" 200 ") {
            bail!(
                "metrics answered {:?}",
                body.lines().next().unwrap_or_default()
            );
        }
        Ok(parse(&body))
    }
}

/// The `kcache_fuse_requests_total{op="..."} N` lines of a metrics text.
fn parse(text: &str) -> Counts {
    let mut out = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("kcache_fuse_requests_total{op=\"") else {
            continue;
        };
        let Some((op, tail)) = rest.split_once("\"}") else {
            continue;
        };
        if let Ok(n) = tail.trim().parse::<u64>() {
            out.insert(op.to_owned(), n);
        }
    }
    out
}

/// Requests per file between two readings, largest first, as `total 8.9: lookup 2.0 ...`.
pub fn per_file(before: &Counts, after: &Counts, files: usize) -> String {
    let mut rows: Vec<(&str, f64)> = after
        .iter()
        .map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (k.as_str(), d as f64 / files.max(1) as f64)
        })
        .filter(|(_, v)| *v >= 0.005)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let total: f64 = rows.iter().map(|r| r.1).sum();
    let parts: Vec<String> = rows.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    format!("total {total:.2}: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_from_the_request_lines_only_and_divide_by_files() {
        let text = "# HELP kcache_fuse_requests FUSE requests\n\
                    kcache_fuse_requests_total{op=\"lookup\"} 10\n\
                    kcache_fuse_requests_total{op=\"create\"} 4\n\
                    kcache_opens_total 99\n";
        let before = parse(text);
        assert_eq!(before.len(), 2);
        let after = parse(
            "kcache_fuse_requests_total{op=\"lookup\"} 18\n\
             kcache_fuse_requests_total{op=\"create\"} 8\n\
             kcache_fuse_requests_total{op=\"rename\"} 4\n",
        );
        assert_eq!(
            per_file(&before, &after, 4),
            "total 4.00: lookup 2.00, create 1.00, rename 1.00"
        );
    }
}
