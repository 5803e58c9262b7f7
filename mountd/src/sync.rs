//! Background push and follow of one mounted volume (mount options `push=URL[:TAG]`,
//! `push_interval=`, `follow=URL:TAG`, `follow_interval=`), each on a thread of its own.
//!
//! Push: uploads every local blob of the volume no upstream holds yet (the queue is the
//! store's own state, `Store::unpushed_blobs`, so it survives restarts and outages), as soon
//! as it is committed (polled every second), retrying with backoff while the upstream is down;
//! and publishes the volume's snapshot under TAG (an additive push: see `Store::push_with`)
//! every `push_interval` seconds when something changed, and once more at unmount.
//! Follow: merges TAG's snapshot into the live volume every `follow_interval` seconds (the
//! rule of `kcache pull`: local names win conflicts), fetching content lazily.
//! Every run is recorded in the store (`Store::sync_record`) for `kcache stats`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use kcache_fs::KcacheFs;
use kcache_store::{Remote, SyncKind, SyncOutcome, Upstream};

use crate::cli::MountOpts;

/// Default seconds between publishes (push) and merges (follow).
const DEFAULT_INTERVAL: u64 = 30;
/// Blobs uploaded per round before the queue is looked at again.
const BATCH: u64 = 256;
/// Longest pause after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The running push and follow threads of one mount; `stop` ends them (push publishes once
/// more first).
pub struct Syncers {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

/// A stop flag threads can sleep on.
struct Stop {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Stop {
    fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps for `d` or until stopped; true when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.stopped() {
            return true;
        }
        let _ = self.cv.wait_timeout(g, d);
        self.stopped()
    }
}

impl Syncers {
    /// Starts what `opts` asks for on `fs` (nothing when it asks for neither).
    pub fn start(fs: &Arc<KcacheFs>, opts: &MountOpts) -> Result<Syncers> {
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let mut threads = Vec::new();
        let timeout = Duration::from_secs(opts.fetch_timeout.unwrap_or(30));
        if let Some((url, tag)) = &opts.push {
            let up = Upstream::parse_with(url, timeout, None).map_err(|e| anyhow::anyhow!(e))?;
            let tag = tag.clone().unwrap_or_else(|| fs.volume().name.clone());
            // Read (and checked) at mount: a bad key fails the mount, not every publish.
            let sign = match &opts.push_sign {
                Some(p) => {
                    let k = std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("push_sign: reading {}: {e}", p.display()))?
                        .trim()
                        .to_owned();
                    kcache_store::public_key_of(&k)
                        .map_err(|e| anyhow::anyhow!("push_sign: {}: {e}", p.display()))?;
                    Some(k)
                }
                None => None,
            };
            let every = Duration::from_secs(opts.push_interval.unwrap_or(DEFAULT_INTERVAL));
            tracing::info!(upstream = %url, %tag, every_s = every.as_secs(), "pushing in the background");
            let job = PushJob {
                fs: fs.clone(),
                up,
                url: url.clone(),
                tag,
                every,
                sign,
            };
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("push".into())
                    .spawn(move || job.run(&stop))?,
            );
        }
        if let Some((url, tag)) = &opts.follow {
            let up = Upstream::parse_with(url, timeout, None).map_err(|e| anyhow::anyhow!(e))?;
            let remote = Arc::new(Remote::new(vec![up], Default::default())?);
            let every = Duration::from_secs(opts.follow_interval.unwrap_or(DEFAULT_INTERVAL));
            tracing::info!(upstream = %url, %tag, every_s = every.as_secs(), "following in the background");
            let job = FollowJob {
                fs: fs.clone(),
                remote,
                url: url.clone(),
                tag: tag.clone(),
                every,
            };
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("follow".into())
                    .spawn(move || job.run(&stop))?,
            );
        }
        Ok(Syncers { stop, threads })
    }

    /// Stops the threads and waits for them (push publishes what it has first).
    pub fn stop(self) {
        {
            let _g = self.stop.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.stop.flag.store(true, Ordering::SeqCst);
            self.stop.cv.notify_all();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Doubles a pause up to `MAX_BACKOFF`.
fn backoff(d: Duration) -> Duration {
    (d * 2).min(MAX_BACKOFF)
}

struct PushJob {
    fs: Arc<KcacheFs>,
    up: Upstream,
    url: String,
    tag: String,
    every: Duration,
    /// Secret key (hex) the published snapshots are signed with.
    sign: Option<String>,
}

impl PushJob {
    fn record(&self, outcome: SyncOutcome) {
        let volume = &self.fs.volume().name;
        if let Err(e) =
            self.fs
                .store()
                .sync_record(SyncKind::Push, &self.url, &self.tag, volume, &outcome)
        {
            tracing::warn!(error = %e, "recording the push's progress failed");
        }
    }

    /// Uploads what is queued, in batches, until the queue is empty or an upload fails.
    fn drain(&self) -> Result<(), String> {
        let store = self.fs.store();
        let volume = &self.fs.volume().name;
        loop {
            let batch = store
                .unpushed_blobs(volume, BATCH)
                .map_err(|e| e.to_string())?;
            if batch.is_empty() {
                return Ok(());
            }
            let (blobs, bytes) = store
                .upload_queued(&self.up, &batch)
                .map_err(|e| e.to_string())?;
            tracing::debug!(blobs, bytes, "uploaded queued content");
            self.record(SyncOutcome::Done {
                blobs,
                bytes,
                publish: false,
            });
        }
    }

    /// More queued than an unmount should wait for (`UNMOUNT_UPLOAD` bytes): the final
    /// publish is then left to the next mount of the volume, which finds the queue as it was.
    fn too_much_left(&self) -> bool {
        const UNMOUNT_UPLOAD: u64 = 256 << 20;
        let volume = &self.fs.volume().name;
        match self.fs.store().unpushed_blobs(volume, u64::MAX >> 1) {
            Ok(q) => {
                let bytes: u64 = q.iter().map(|b| b.1).sum();
                if bytes > UNMOUNT_UPLOAD {
                    tracing::warn!(blobs = q.len(), bytes, upstream = %self.url, "unmounting with content not yet pushed; the next mount uploads it and publishes");
                    return true;
                }
                false
            }
            Err(_) => false,
        }
    }

    fn publish(&self) -> Result<(), String> {
        let volume = &self.fs.volume().name;
        let r = self
            .fs
            .store()
            .push_with(
                &self.up,
                volume,
                &self.tag,
                self.sign.as_deref(),
                false,
                &mut |_| {},
            )
            .map_err(|e| e.to_string())?;
        tracing::info!(tag = %self.tag, manifest = %r.manifest, uploaded = r.blobs_uploaded, "published the volume's snapshot");
        self.record(SyncOutcome::Done {
            blobs: r.blobs_uploaded,
            bytes: r.bytes_uploaded,
            publish: true,
        });
        Ok(())
    }

    fn run(self, stop: &Stop) {
        let mut pause = Duration::from_secs(1);
        // Published at start too: a restarted daemon publishes what it had not yet.
        let mut next_publish = Instant::now();
        let mut published_at_commits: Option<u64> = None;
        loop {
            let stopping = stop.stopped();
            if stopping && self.too_much_left() {
                // Uploading it all would hold up the unmount; it goes at the next mount.
                return;
            }
            let res = self.drain().and_then(|()| {
                let commits = self.fs.commits();
                let due = stopping || Instant::now() >= next_publish;
                if due && published_at_commits != Some(commits) {
                    self.publish()?;
                    published_at_commits = Some(commits);
                }
                if due {
                    next_publish = Instant::now() + self.every;
                }
                Ok(())
            });
            match res {
                Ok(()) => pause = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(upstream = %self.url, error = %e, retry_s = pause.as_secs(), "background push failed; retrying");
                    self.record(SyncOutcome::Failed(e));
                    pause = backoff(pause);
                }
            }
            if stopping {
                return;
            }
            // Polled rather than woken by commits: a second's delay, no coupling with the
            // commit path; after a failure, the backoff.
            stop.sleep(pause);
        }
    }
}

struct FollowJob {
    fs: Arc<KcacheFs>,
    remote: Arc<Remote>,
    url: String,
    tag: String,
    every: Duration,
}

impl FollowJob {
    fn run(self, stop: &Stop) {
        let mut failing = Duration::from_secs(1);
        // The manifest last merged.
        let mut merged: Option<String> = None;
        loop {
            let store = self.fs.store();
            let volume = self.fs.volume().name.clone();
            // An unchanged tag costs one small read, not a merge (which walks the whole tree
            // in one transaction).
            if let (Ok(m), Some(last)) = (store.tag_manifest(&self.remote, &self.tag), &merged) {
                if &m == last {
                    if stop.sleep(self.every) {
                        return;
                    }
                    continue;
                }
            }
            let res = store
                .trusted_keys()
                .and_then(|trusted| self.fs.pull_merge(&self.remote, &self.tag, &trusted, false))
                .map_err(|e| e.to_string());
            let outcome = match res {
                Ok(r) => {
                    merged = Some(r.manifest.clone());
                    if r.added + r.updated > 0 {
                        tracing::info!(tag = %self.tag, added = r.added, updated = r.updated, kept = r.kept, "merged the followed snapshot");
                    }
                    failing = Duration::from_secs(1);
                    SyncOutcome::Done {
                        blobs: r.added + r.updated,
                        bytes: 0,
                        publish: true,
                    }
                }
                Err(e) => {
                    tracing::warn!(upstream = %self.url, tag = %self.tag, error = %e, "following failed; retrying");
                    failing = backoff(failing);
                    SyncOutcome::Failed(e)
                }
            };
            if let Err(e) =
                store.sync_record(SyncKind::Follow, &self.url, &self.tag, &volume, &outcome)
            {
                tracing::warn!(error = %e, "recording the follow's progress failed");
            }
            let pause = if matches!(outcome, SyncOutcome::Failed(_)) {
                failing.min(self.every)
            } else {
                self.every
            };
            if stop.sleep(pause) {
                return;
            }
        }
    }
}
