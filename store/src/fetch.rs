//! Fetching blobs that only an upstream has (state `remote`): one download per blob however
//! many want it, streamed into a staging file and verified before anything is served, readable
//! while it arrives, and cancelled once nobody wants it any more.
//!
//! A download is a `Flight`; everyone who wants the blob holds a `Lease` on it. The store's
//! `Downloads` table holds the flights, one per blob whichever mount asks (see `downloads`);
//! the `Remote` a caller passes only says where a download it starts comes from. A background
//! thread streams the blob from the first of those upstreams that has it. Blobs larger than
//! one group (see `outboard`) are verified group by group against their outboard, so a reader
//! waits only for the groups it reads, and a read far ahead of the stream fetches its group
//! with a ranged request first. Blobs without an outboard (small ones, or an upstream that has
//! none) are verified whole, and readers wait for the end. The staging file only ever holds
//! verified groups where a reader can see them; it becomes the local blob once every group is
//! there.
//!
//! Time bound: a download that makes no progress for the configured fetch timeout fails, and
//! so do its readers. Progress (a verified group) restarts the clock, so a large file on a slow
//! but working link is not cut off.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;

use crate::downloads::{Download, Downloads};
use crate::error::{Error, IoContext, Result};
use crate::lifecycle::BlobState;
use crate::outboard::{self, group_range, groups, GROUP};
use crate::remote::{blob_key, lock, rand_u64, GetError, Remote, Upstream};
use crate::{Hash, Store};

/// A read this many groups beyond the stream's position fetches its group by range rather
/// than waiting: the stream reaches nearer groups about as soon.
const AHEAD: u64 = 4;

/// After this many failed ranged fetches, readers of a download just wait for its stream.
const RANGE_FAILURES: u32 = 3;

/// How often waiting readers look again at the clock and at whether they are still wanted.
const POLL: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Have {
    Missing,
    /// A reader is fetching it by range.
    Fetching,
    Done,
}

/// One download in progress.
pub struct Flight {
    hash: Hash,
    size: u64,
    file: File,
    path: PathBuf,
    /// The verified outboard; set (to `None` for whole-blob verification) before streaming.
    cvs: OnceLock<Option<Vec<ChainingValue>>>,
    timeout: Duration,
    /// Where it streams from: the upstreams of the request that started it.
    remote: Arc<Remote>,
    st: Mutex<FState>,
    cv: Condvar,
    /// The errno of a local failure to keep the download (ENOSPC, EIO), 0 if none: waiters
    /// get that errno, not a generic fetch error.
    local_errno: std::sync::atomic::AtomicI32,
}

struct FState {
    have: Vec<Have>,
    /// The group the stream reads next.
    frontier: u64,
    /// Set once: Ok when the blob is local, Err with the reason otherwise.
    done: Option<std::result::Result<(), String>>,
    /// Leases held: open handles and waiting opens.
    interest: usize,
    cancelled: bool,
    /// Every byte is there and verified: only adoption is left, which nothing cancels.
    complete: bool,
    range_failures: u32,
    /// Last verified progress (or the start).
    progress: Instant,
}

/// A claim on a download: while any lease is held the download goes on; reads go through it.
pub struct Lease {
    flight: Arc<Flight>,
    /// The lease holder's upstreams, for the ranged fetches of its own reads (the stream
    /// comes from the upstreams of whoever started the download).
    remote: Arc<Remote>,
    downloads: Arc<Downloads<Flight>>,
}

/// What a pass over an upstream's stream ended with.
enum Pass {
    Complete,
    /// Groups ahead are already there (fetched by range): skip to the next missing one.
    Skip,
}

/// Why a pass stopped early.
enum PassError {
    Get(GetError),
    /// The upstream sent bytes that do not match the hash.
    Wrong(String),
    /// A local failure (staging file): no upstream can help.
    Local(String),
}

impl Store {
    /// Starts, or joins, the download of blob `h` if only an upstream has it; `None` if the
    /// blob is local (or unknown). The download goes on while the lease is held. A download
    /// already under way is joined whoever started it; a new one streams from `remote`'s
    /// upstreams (the caller's: a mount's own, see `KcacheFs`).
    pub fn fetch(self: &Arc<Self>, h: &Hash, remote: &Arc<Remote>) -> Result<Option<Lease>> {
        let row = crate::lifecycle::row(&self.conn(), h)?;
        let Some(size) = row
            .filter(|r| r.state == BlobState::RemoteOnly)
            .map(|r| r.size)
        else {
            return Ok(None);
        };
        let (flight, started) = self.downloads.join_or_start(h, || {
            let (file, path) = self.blobs().new_staging()?;
            if let Err(e) = reserve(&file, size) {
                let _ = fs::remove_file(&path);
                return Err(Error::io(
                    format!("reserving {size} bytes for {}", path.display()),
                    e,
                ));
            }
            Ok(Arc::new(Flight {
                hash: *h,
                size,
                file,
                path,
                cvs: OnceLock::new(),
                timeout: remote.config.timeout,
                remote: remote.clone(),
                st: Mutex::new(FState {
                    have: vec![Have::Missing; groups(size) as usize],
                    frontier: 0,
                    done: None,
                    interest: 1,
                    cancelled: false,
                    complete: false,
                    range_failures: 0,
                    progress: Instant::now(),
                }),
                cv: Condvar::new(),
                local_errno: Default::default(),
            }))
        })?;
        if started {
            let (store, f) = (self.clone(), flight.clone());
            let spawned = std::thread::Builder::new()
                .name("kcache-fetch".into())
                .spawn(move || f.run(&store));
            if let Err(e) = spawned {
                flight.finish(&self.downloads, Err(format!("starting the download: {e}")));
            }
        }
        Ok(Some(Lease {
            flight,
            remote: remote.clone(),
            downloads: self.downloads.clone(),
        }))
    }

    /// Makes blob `h` local, downloading it from `remote`'s upstreams if only a remote copy
    /// exists (concurrent callers share one download, whatever upstreams they name), and
    /// waits for it. `alive` is asked now and then whether the caller still wants it.
    /// Returns whether the blob had to be fetched.
    pub fn ensure_local(
        self: &Arc<Self>,
        h: &Hash,
        remote: &Arc<Remote>,
        alive: &dyn Fn() -> bool,
    ) -> Result<bool> {
        let mut retried = false;
        loop {
            let Some(lease) = self.fetch(h, remote)? else {
                return Ok(retried);
            };
            match lease.wait(alive) {
                Ok(()) => return Ok(true),
                // Joined a download from another mount's upstreams that failed there: once
                // more, from this caller's own (a failed download is never joined again).
                Err(_) if !retried && lease.may_retry_with_own_upstreams() => retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a download of blob `h` is under way (a new open would join it), whichever
    /// mount started it.
    pub fn is_fetching(&self, h: &Hash) -> bool {
        self.downloads.is_fetching(h)
    }

    /// Waits, at most `bound`, for downloads whose bytes have all arrived and are being
    /// synced and adopted: on shutdown, leaving now would throw them away. Every download of
    /// the store counts, whichever mount's upstreams it came from. Unfinished ones are not
    /// waited for (their staging files go at the next start). Returns how many were still
    /// being adopted when the bound ran out.
    pub fn drain_fetches(&self, bound: Duration) -> usize {
        self.downloads.drain(bound)
    }

    /// Moves a downloaded, verified blob into place (the one install path, `install_blob`,
    /// durably: the bytes and the rename are on disk before the index says the blob is
    /// local) and marks it local.
    fn adopt_fetched(&self, f: &Flight) -> Result<()> {
        // On disk before the index says it is there, and before the index lock: a crash
        // must not leave a local blob with missing bytes.
        self.faults.check(crate::faults::Step::SyncData)?;
        f.file
            .sync_data()
            .ctx(|| format!("syncing {}", f.path.display()))?;
        // Under the index's lock, which every path that makes a blob local holds: look, then
        // install. Another download of the same blob (one started after this one was
        // cancelled) or a write of the same bytes may have made it local meanwhile, or its
        // last name may be gone; renaming over that file would take it from under the index.
        let conn = self.conn();
        let state = crate::lifecycle::row(&conn, &f.hash)?.map(|r| r.state);
        if state != Some(BlobState::RemoteOnly) {
            let _ = fs::remove_file(&f.path);
            return Ok(());
        }
        let (file_ino, blocks) = self
            .blobs()
            .install_blob(&f.path, &f.file, &f.hash, true, false)?;
        self.faults.check(crate::faults::Step::DbCommit)?;
        crate::lifecycle::fetched(&conn, &f.hash, file_ino, self.next_access_seq(), blocks)?;
        Ok(())
    }
}

impl Flight {
    /// The download thread.
    fn run(self: Arc<Self>, store: &Store) {
        let remote = &self.remote;
        let cvs = if outboard::needed(self.size) {
            fetch_outboard(remote, &self.hash, self.size)
        } else {
            None
        };
        let _ = self.cvs.set(cvs);
        self.cv.notify_all();
        let res = self.stream(remote).and_then(|()| {
            // Readers may have every byte already and go away; the blob is kept all the same.
            lock(&self.st).complete = true;
            store.adopt_fetched(&self).map_err(|e| {
                self.local_errno
                    .store(e.errno(), std::sync::atomic::Ordering::SeqCst);
                format!("keeping the download: {e}")
            })
        });
        match &res {
            Ok(()) => {
                tracing::info!(hash = %self.hash, bytes = self.size, "fetched blob")
            }
            Err(e) => tracing::warn!(hash = %self.hash, error = %e, "fetch failed"),
        }
        self.finish(&store.downloads, res);
    }

    /// Records the outcome, wakes everyone, and lets a later open start afresh.
    fn finish(&self, downloads: &Downloads<Flight>, res: std::result::Result<(), String>) {
        if res.is_err() {
            let _ = fs::remove_file(&self.path);
        }
        downloads.settle(&self.hash, self, || {
            let mut st = lock(&self.st);
            if res.is_ok() {
                st.have.fill(Have::Done);
            }
            st.done = Some(res);
            self.cv.notify_all();
            true
        });
    }

    fn cvs(&self) -> Option<&[ChainingValue]> {
        self.cvs.get().and_then(|c| c.as_deref())
    }

    /// Streams the blob from the upstreams in order: retries with jittered exponential
    /// backoff on transient errors, the next upstream on a missing blob, wrong bytes or a
    /// refusal, and gives up when nothing verified arrived for the timeout.
    fn stream(&self, remote: &Remote) -> std::result::Result<(), String> {
        let key = blob_key(&self.hash);
        let mut errors: Vec<String> = Vec::new();
        let (mut ui, mut attempt) = (0, 0);
        let mut delay = Duration::from_millis(100);
        loop {
            let (start, progress) = {
                let st = lock(&self.st);
                // Whole first: a reader who read the last bytes and left cancels nothing.
                let start = match self.cvs() {
                    Some(_) => match st.have.iter().position(|h| *h != Have::Done) {
                        Some(g) => g as u64,
                        None => return Ok(()),
                    },
                    None => 0,
                };
                if st.cancelled {
                    return Err("cancelled: nobody wants it any more".into());
                }
                (start, st.progress)
            };
            let Some(up) = remote.upstreams.get(ui) else {
                return Err(give_up(errors, self.timeout));
            };
            if progress.elapsed() >= self.timeout {
                return Err(give_up(errors, self.timeout));
            }
            match self.pass(remote, up, &key, start) {
                Ok(Pass::Complete) => return Ok(()),
                Ok(Pass::Skip) => {}
                Err(PassError::Local(e)) => return Err(e),
                Err(PassError::Wrong(e)) => {
                    errors.push(e);
                    (ui, attempt) = (ui + 1, 0);
                }
                Err(PassError::Get(GetError::Missing)) => {
                    errors.push(format!("{}: not found", up.url_of(&key)));
                    (ui, attempt) = (ui + 1, 0);
                }
                Err(PassError::Get(GetError::Fatal(e))) => {
                    errors.push(e);
                    (ui, attempt) = (ui + 1, 0);
                }
                Err(PassError::Get(GetError::Transient(e))) => {
                    tracing::warn!(hash = %self.hash, attempt, error = %e, "fetch failed; retrying");
                    errors.push(e);
                    if lock(&self.st).progress != progress {
                        // It got somewhere: count retries afresh.
                        (attempt, delay) = (0, Duration::from_millis(100));
                    }
                    attempt += 1;
                    if attempt >= 4 {
                        (ui, attempt, delay) = (ui + 1, 0, Duration::from_millis(100));
                        continue;
                    }
                    let jitter = Duration::from_millis(rand_u64() % (delay.as_millis() as u64 + 1));
                    let left = self
                        .timeout
                        .saturating_sub(lock(&self.st).progress.elapsed());
                    if delay + jitter >= left {
                        // Readers' ranged fetches may have brought in everything meanwhile.
                        if self.cvs().is_some()
                            && lock(&self.st).have.iter().all(|h| *h == Have::Done)
                        {
                            return Ok(());
                        }
                        return Err(give_up(errors, self.timeout));
                    }
                    std::thread::sleep(delay + jitter);
                    delay *= 2;
                }
                Err(PassError::Get(GetError::NoRange)) => {
                    // Not asked for (the stream accepts whole answers); treat as a refusal.
                    errors.push(format!("{}: unusable answer to a range", up.url_of(&key)));
                    (ui, attempt) = (ui + 1, 0);
                }
            }
        }
    }

    /// One GET from group `start` on: verifies and stores group after group.
    fn pass(
        &self,
        remote: &Remote,
        up: &Upstream,
        key: &str,
        start: u64,
    ) -> std::result::Result<Pass, PassError> {
        let url = up.url_of(key);
        let mut r = up
            .open_read(&remote.client, key, start * GROUP, None, true)
            .map_err(PassError::Get)?;
        let cvs = self.cvs();
        let mut whole = cvs.is_none().then(blake3::Hasher::new);
        let mut buf = vec![0u8; GROUP.min(self.size) as usize];
        let n = groups(self.size);
        for g in start..n {
            {
                let st = lock(&self.st);
                if st.cancelled {
                    return Ok(Pass::Skip);
                }
                if cvs.is_some()
                    && g > start
                    && st.have[g as usize] == Have::Done
                    && st.have.get(g as usize + 1) == Some(&Have::Done)
                {
                    return Ok(Pass::Skip);
                }
            }
            let (s, e) = group_range(self.size, g);
            let data = &mut buf[..(e - s) as usize];
            read_full(&mut r, data).map_err(|e| {
                PassError::Get(GetError::Transient(format!("{url}: {e} (at byte {s})")))
            })?;
            match (cvs, &mut whole) {
                (Some(cvs), _) => {
                    if outboard::group_cv(g, data) != cvs[g as usize] {
                        tracing::error!(hash = %self.hash, url = %url, offset = s, "upstream sent wrong bytes; not cached");
                        return Err(PassError::Wrong(format!(
                            "{url}: wrong content at byte {s}"
                        )));
                    }
                }
                (None, Some(h)) => {
                    h.update(data);
                }
                (None, None) => unreachable!("a whole-blob hasher exists without an outboard"),
            }
            write_sparse(&self.file, data, s)
                .map_err(|e| PassError::Local(format!("writing {}: {e}", self.path.display())))?;
            let mut st = lock(&self.st);
            st.progress = Instant::now();
            if cvs.is_some() {
                st.have[g as usize] = Have::Done;
                st.frontier = g + 1;
                self.cv.notify_all();
            }
        }
        if let Some(h) = whole {
            let got = Hash(*h.finalize().as_bytes());
            if got != self.hash {
                tracing::error!(hash = %self.hash, url = %url, got = %got, "upstream sent wrong bytes; not cached");
                return Err(PassError::Wrong(format!("{url}: wrong content")));
            }
        }
        Ok(Pass::Complete)
    }
}

/// Gives the staging file its full size with the disk blocks reserved, so a disk that cannot
/// hold the blob says so now (ENOSPC to the open) rather than half-way through the download.
/// Filesystems without fallocate get a sparse file.
fn reserve(file: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if size > 0 {
        let len =
            i64::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
        ) {
            return Err(e);
        }
    }
    file.set_len(size)
}

/// Writes verified bytes at `offset` of a download's staging file, leaving every aligned
/// 4 KiB block of zeros as a hole, so a sparse blob stays sparse when fetched (the blob's
/// bytes are the same: a hole reads as zeros). The file was reserved by `reserve` (reads as
/// zeros there), and only verified bytes are ever written, so a block of zeros never has
/// anything else under it; punching merely gives its reserved space back. Where the
/// filesystem cannot punch holes the zeros are written.
fn write_sparse(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const BLOCK: u64 = 4096;
    let is_zero_block = |at: usize, len: usize| {
        let b = &data[at..at + len];
        // Most blocks of data give up at their first bytes; the rest is a vectorised OR.
        (offset + at as u64) % BLOCK == 0
            && len as u64 == BLOCK
            && b[..16].iter().all(|&x| x == 0)
            && b.iter().fold(0u8, |a, &x| a | x) == 0
    };
    // Runs of blocks of the same kind (zeros or not), cut at the file's block boundaries.
    let mut at = 0usize;
    while at < data.len() {
        let block_len = |from: usize| {
            let pos = offset + from as u64;
            ((BLOCK - pos % BLOCK) as usize).min(data.len() - from)
        };
        let zero = is_zero_block(at, block_len(at));
        let mut end = at + block_len(at);
        while end < data.len() && is_zero_block(end, block_len(end)) == zero {
            end += block_len(end);
        }
        let run = &data[at..end];
        let pos = offset + at as u64;
        let punched = zero && {
            let (p, l) = (i64::try_from(pos), i64::try_from(run.len()));
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            matches!((p, l), (Ok(p), Ok(l)) if unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    p,
                    l,
                )
            } == 0)
        };
        if !punched {
            file.write_all_at(run, pos)?;
        }
        at = end;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, naming a short body as such.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("body ended {} bytes early", buf.len() - done),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The outboard of blob `h` from the first upstream that has one that adds up; `None` means
/// the blob is verified whole (and readers wait for all of it).
fn fetch_outboard(remote: &Remote, h: &Hash, size: u64) -> Option<Vec<ChainingValue>> {
    let key = outboard_key(h);
    for up in &remote.upstreams {
        match up.get_bytes(&remote.client, &key) {
            Ok(Some(bytes)) => match outboard::parse_verified(&bytes, h, size) {
                Ok(cvs) => return Some(cvs),
                Err(e) => {
                    tracing::error!(hash = %h, url = %up.url_of(&key), error = %e, "bad outboard; not used")
                }
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(hash = %h, error = %e, "no outboard"),
        }
    }
    None
}

/// Where a blob's outboard lives on an upstream.
pub(crate) fn outboard_key(h: &Hash) -> String {
    let hex = h.to_hex();
    format!("outboards/{}/{hex}", &hex[..2])
}

impl Lease {
    pub fn hash(&self) -> Hash {
        self.flight.hash
    }

    /// Whether reads can be served while the download goes on (the blob has a verified
    /// outboard); waits until the download thread knows.
    pub fn streamable(&self) -> bool {
        let f = &self.flight;
        let mut st = lock(&f.st);
        while f.cvs.get().is_none() && st.done.is_none() {
            st =
                f.cv.wait_timeout(st, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        f.cvs().is_some()
    }

    /// Waits until the blob is local. `alive` is asked now and then whether the caller still
    /// wants it; when it says no, this returns an error (and dropping the lease may cancel).
    pub fn wait(&self, alive: &dyn Fn() -> bool) -> Result<()> {
        let f = &self.flight;
        let mut st = lock(&f.st);
        loop {
            match &st.done {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(self.error(e.clone())),
                None => {}
            }
            st =
                f.cv.wait_timeout(st, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            if st.done.is_none() && !alive() {
                return Err(self.error("the reader went away".into()));
            }
        }
    }

    fn error(&self, reason: String) -> Error {
        let errno = self
            .flight
            .local_errno
            .load(std::sync::atomic::Ordering::SeqCst);
        if errno != 0 {
            return Error::io(
                format!("fetching blob {}: {reason}", self.flight.hash),
                std::io::Error::from_raw_os_error(errno),
            );
        }
        Error::Fetch {
            hash: self.flight.hash,
            reason,
        }
    }

    /// Whether a fresh request with this lease's own upstreams may succeed where the
    /// download it joined failed: the download failed at its upstreams (not a local failure:
    /// no room, a disk error) and was started from other upstreams than this lease's (another
    /// mount's). A joined download spares a second transfer, but must not cost a mount the
    /// upstreams it was given.
    pub fn may_retry_with_own_upstreams(&self) -> bool {
        let f = &self.flight;
        let failed = matches!(lock(&f.st).done, Some(Err(_)));
        let local = f.local_errno.load(std::sync::atomic::Ordering::SeqCst) != 0;
        let retry = failed && !local && !Arc::ptr_eq(&f.remote, &self.remote);
        if retry {
            tracing::info!(hash = %f.hash, "a download joined from other upstreams failed; trying this caller's own");
        }
        retry
    }

    /// Whether the download has ended (the blob is local, or it failed).
    pub fn is_done(&self) -> bool {
        lock(&self.flight.st).done.is_some()
    }

    /// Whether `len` bytes at `offset` can be read without waiting.
    pub fn ready(&self, offset: u64, len: u64) -> bool {
        let f = &self.flight;
        let st = lock(&f.st);
        if st.done.is_some() {
            // Local now, or an error to report: either way no waiting.
            return true;
        }
        if f.cvs().is_none() {
            return false;
        }
        let end = offset.saturating_add(len).min(f.size);
        if offset >= end {
            return true;
        }
        (offset / GROUP..=(end - 1) / GROUP).all(|g| st.have[g as usize] == Have::Done)
    }

    /// Reads at `offset` into `buf`, waiting for (or fetching first) the groups it covers.
    /// Returns the bytes read; fewer than asked only at the end of the blob.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let f = &self.flight;
        let end = offset.saturating_add(buf.len() as u64).min(f.size);
        if offset >= end {
            return Ok(0);
        }
        for g in offset / GROUP..=(end - 1) / GROUP {
            self.ensure_group(g)?;
        }
        let want = (end - offset) as usize;
        f.file
            .read_exact_at(&mut buf[..want], offset)
            .ctx(|| format!("reading {}", f.path.display()))?;
        Ok(want)
    }

    /// Waits until group `g` is verified in the staging file; fetches it by range first if
    /// the stream is far from it.
    fn ensure_group(&self, g: u64) -> Result<()> {
        let f = &self.flight;
        let mut st = lock(&f.st);
        loop {
            match &st.done {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(self.error(e.clone())),
                None => {}
            }
            if st.have[g as usize] == Have::Done {
                return Ok(());
            }
            if st.progress.elapsed() >= f.timeout {
                return Err(self.error(format!(
                    "nothing arrived for {:?} (fetch timeout)",
                    f.timeout
                )));
            }
            if f.cvs().is_some()
                && st.have[g as usize] == Have::Missing
                && g > st.frontier + AHEAD
                && st.range_failures < RANGE_FAILURES
            {
                st.have[g as usize] = Have::Fetching;
                drop(st);
                let res = self.fetch_group(g);
                st = lock(&f.st);
                match res {
                    Ok(()) => {
                        st.have[g as usize] = Have::Done;
                        st.progress = Instant::now();
                        f.cv.notify_all();
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(hash = %f.hash, group = g, error = %e, "ranged fetch failed; waiting for the stream");
                        if st.have[g as usize] == Have::Fetching {
                            st.have[g as usize] = Have::Missing;
                        }
                        st.range_failures += 1;
                        f.cv.notify_all();
                        continue;
                    }
                }
            }
            st =
                f.cv.wait_timeout(st, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
    }

    /// Fetches group `g` alone with a ranged request, verifies it and stores it.
    fn fetch_group(&self, g: u64) -> std::result::Result<(), String> {
        let f = &self.flight;
        let cvs = f.cvs().expect("ranged fetches need an outboard");
        let key = blob_key(&f.hash);
        let (s, e) = group_range(f.size, g);
        let mut buf = vec![0u8; (e - s) as usize];
        let mut errors = Vec::new();
        for up in &self.remote.upstreams {
            let url = up.url_of(&key);
            let got = up
                .open_read(&self.remote.client, &key, s, Some(e), false)
                .map_err(|e| match e {
                    GetError::Missing => format!("{url}: not found"),
                    GetError::NoRange => format!("{url}: ranges not supported"),
                    GetError::Transient(m) | GetError::Fatal(m) => m,
                })
                .and_then(|mut r| {
                    read_full(&mut r, &mut buf).map_err(|e| format!("{url}: {e} (at byte {s})"))
                });
            if let Err(e) = got {
                errors.push(e);
                continue;
            }
            if outboard::group_cv(g, &buf) != cvs[g as usize] {
                tracing::error!(hash = %f.hash, url = %url, offset = s, "upstream sent wrong bytes; not cached");
                errors.push(format!("{url}: wrong content at byte {s}"));
                continue;
            }
            return write_sparse(&f.file, &buf, s)
                .map_err(|e| format!("writing {}: {e}", f.path.display()));
        }
        Err(errors.join("; "))
    }
}

impl Drop for Lease {
    /// The last lease of an unfinished download cancels it: nobody would read the result.
    fn drop(&mut self) {
        let f = &self.flight;
        self.downloads.settle(&f.hash, f, || {
            let mut st = lock(&f.st);
            st.interest -= 1;
            let whole = st.complete || st.have.iter().all(|h| *h == Have::Done);
            if st.interest == 0 && st.done.is_none() && !whole {
                st.cancelled = true;
                tracing::info!(hash = %f.hash, "download cancelled: nobody reads it any more");
                f.cv.notify_all();
                return true;
            }
            false
        });
    }
}

impl Download for Flight {
    fn join(&self) -> bool {
        let mut st = lock(&self.st);
        if st.cancelled || matches!(st.done, Some(Err(_))) {
            return false;
        }
        st.interest += 1;
        true
    }

    fn running(&self) -> bool {
        !lock(&self.st).cancelled
    }

    fn keeping(&self) -> bool {
        let st = lock(&self.st);
        st.complete || (self.cvs().is_some() && st.have.iter().all(|h| *h == Have::Done))
    }
}

fn give_up(mut errors: Vec<String>, timeout: Duration) -> String {
    if errors.is_empty() {
        errors.push(format!("no upstream answered within {timeout:?}"));
    }
    errors.join("; ")
}
