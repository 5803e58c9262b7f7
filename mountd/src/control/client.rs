//! The command's end of the control socket: sends one request to a store's daemon and reads
//! its progress lines and answer back as typed replies. Whether to ask the daemon at all, and
//! waiting for one that is starting or leaving, is `holder`'s business.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kcache_store::PushProgress;

use super::protocol::{Answer, ProgressLine, Reply, Request};
use super::socket_path;

/// The daemon answered that it is shutting down: it did nothing with the request, which may
/// be sent again once the store has settled (see `holder`).
#[derive(Debug)]
pub struct Leaving;

impl std::fmt::Display for Leaving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the store's daemon is shutting down")
    }
}

impl std::error::Error for Leaving {}

/// No daemon took the connection: the request was never sent.
#[derive(Debug)]
pub struct Unanswered {
    socket: PathBuf,
    err: std::io::Error,
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connecting to the daemon at {} (is the store mounted?): {}",
            self.socket.display(),
            self.err
        )
    }
}

impl std::error::Error for Unanswered {}

/// True when `e` says the daemon is shutting down (the request was not carried out).
pub fn is_leaving(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Leaving>().is_some()
}

/// True when `e` says no daemon took the connection (the request was not sent).
pub fn is_unanswered(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unanswered>().is_some()
}

/// Sends one request to the daemon of `store` and returns its reply.
pub fn call(store: &Path, req: &Request) -> Result<Reply> {
    call_with_progress(store, req, &mut |_| {})
}

/// Like `call`, passing the daemon's progress reports to `progress` as they arrive.
pub fn call_with_progress(
    store: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&PushProgress),
) -> Result<Reply> {
    let path = socket_path(store);
    let conn = UnixStream::connect(&path).map_err(|err| Unanswered {
        socket: path.clone(),
        err,
    })?;
    let mut w = &conn;
    // A daemon closing its socket as it leaves can still have let the connection in: the
    // request then cannot be written (EPIPE), or is dropped unread (ECONNRESET, which a
    // socket closed with unread data sends). Either way it was not carried out, so the
    // caller may try again, as when nobody took the connection.
    let unread = |err: std::io::Error| Unanswered {
        socket: path.clone(),
        err,
    };
    w.write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())
        .map_err(unread)?;
    let mut r = BufReader::new(&conn);
    let mut first = true;
    let answer = loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Err(e) if first && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(unread(e).into())
            }
            res => res.context("reading the daemon's answer")?,
        };
        first = false;
        if line.is_empty() {
            bail!("the daemon closed the connection without answering (did it stop?)");
        }
        if let Ok(p) = serde_json::from_str::<ProgressLine>(&line) {
            progress(&p.progress);
            continue;
        }
        break serde_json::from_str::<Answer>(&line)
            .with_context(|| format!("the daemon answered something unreadable: {line:?}"))?;
    };
    if answer.leaving {
        return Err(Leaving.into());
    }
    match (answer.ok, answer.result, answer.error) {
        (true, Some(v), _) => Reply::decode(req, v)
            .with_context(|| format!("the daemon's answer to {} does not fit it", req.name())),
        (true, None, _) => bail!("the daemon answered without a result"),
        (false, _, e) => bail!(
            "{}",
            e.unwrap_or_else(|| "the daemon reported an unknown error".into())
        ),
    }
}
