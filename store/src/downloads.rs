//! The store's downloads in flight: one table per store, so each blob is downloaded once
//! however many callers and mounts ask for it, and shutdown can wait for every download that
//! is being kept, whichever mount's upstreams started it.
//!
//! The table belongs to the store, not to an upstream list (`Remote`): mounts of one store
//! may fetch from different upstreams, and a blob is the same bytes wherever it comes from
//! (every download is verified against the hash), so a second request for a blob joins the
//! download already under way rather than starting one of its own. Were the table part of
//! `Remote`, a mount with other upstreams would neither see running downloads (two would
//! race to install the same blob) nor be seen by the shutdown drain.
//!
//! The table knows downloads only through `Download`: the state of one download (interest,
//! progress, the outcome) is `fetch::Flight`'s. Lock order: the table, then a download's own
//! lock (taken inside the `Download` methods and the `settle` closure).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::remote::lock;
use crate::Hash;

/// What the table needs to know of one download.
pub(crate) trait Download {
    /// Adds a claim (a lease) if the download can still deliver: not cancelled, not failed.
    /// Called under the table's lock, so a download found here cannot be retired meanwhile.
    fn join(&self) -> bool;
    /// Not cancelled: a new request for the blob would join it.
    fn running(&self) -> bool;
    /// Every byte is there and verified; only keeping it (sync, install) is left, which
    /// nothing cancels. Shutdown waits for these: leaving now would throw the bytes away.
    fn keeping(&self) -> bool;
}

/// The downloads in flight, by blob. One per store, never replaced.
pub(crate) struct Downloads<D> {
    table: Mutex<HashMap<Hash, Arc<D>>>,
}

impl<D: Download> Default for Downloads<D> {
    fn default() -> Downloads<D> {
        Downloads::new()
    }
}

impl<D: Download> Downloads<D> {
    pub(crate) fn new() -> Downloads<D> {
        Downloads {
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The download of blob `h`: the one in flight if it can be joined (then `false`), else
    /// a new one made by `start` and entered in the table (then `true`). `start` runs under
    /// the table's lock, so two requests for one blob never both start a download. A
    /// download that can no longer deliver (cancelled, failed) is replaced.
    pub(crate) fn join_or_start(
        &self,
        h: &Hash,
        start: impl FnOnce() -> Result<Arc<D>>,
    ) -> Result<(Arc<D>, bool)> {
        let mut table = lock(&self.table);
        if let Some(d) = table.get(h) {
            if d.join() {
                return Ok((d.clone(), false));
            }
        }
        let d = start()?;
        table.insert(*h, d.clone());
        Ok((d, true))
    }

    /// Runs `over` under the table's lock and, if it says download `d` of blob `h` is over
    /// (finished, or cancelled by its last lease), takes it out of the table. Only `d`
    /// itself: a newer download of the same blob, started after `d` was cancelled or failed,
    /// stays. Under the lock, so a request cannot join `d` between `over` deciding and the
    /// removal.
    pub(crate) fn settle(&self, h: &Hash, d: &D, over: impl FnOnce() -> bool) {
        let mut table = lock(&self.table);
        if over()
            && table
                .get(h)
                .is_some_and(|m| std::ptr::eq(Arc::as_ptr(m), d))
        {
            table.remove(h);
        }
    }

    /// Whether a download of blob `h` is under way (a new request would join it).
    pub(crate) fn is_fetching(&self, h: &Hash) -> bool {
        lock(&self.table).get(h).is_some_and(|d| d.running())
    }

    /// How many downloads are being kept right now (see `Download::keeping`).
    pub(crate) fn keeping(&self) -> usize {
        lock(&self.table).values().filter(|d| d.keeping()).count()
    }

    /// Waits, at most `bound`, until no download is being kept; returns how many still were
    /// when the bound ran out. Downloads still arriving are not waited for.
    pub(crate) fn drain(&self, bound: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            let n = self.keeping();
            if n == 0 || t0.elapsed() >= bound {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Barrier;

    /// A download reduced to the flags the table looks at.
    #[derive(Default)]
    struct Fake {
        leases: AtomicUsize,
        cancelled: AtomicBool,
        failed: AtomicBool,
        keeping: AtomicBool,
    }

    impl Download for Fake {
        fn join(&self) -> bool {
            if self.cancelled.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst) {
                return false;
            }
            self.leases.fetch_add(1, Ordering::SeqCst);
            true
        }
        fn running(&self) -> bool {
            !self.cancelled.load(Ordering::SeqCst)
        }
        fn keeping(&self) -> bool {
            self.keeping.load(Ordering::SeqCst)
        }
    }

    fn h(n: u8) -> Hash {
        Hash([n; 32])
    }

    fn fresh(started: &AtomicUsize) -> Result<Arc<Fake>> {
        started.fetch_add(1, Ordering::SeqCst);
        let f = Fake::default();
        f.leases.store(1, Ordering::SeqCst);
        Ok(Arc::new(f))
    }

    #[test]
    fn concurrent_requests_for_one_blob_share_one_download() {
        let downloads = Arc::new(Downloads::<Fake>::new());
        let started = Arc::new(AtomicUsize::new(0));
        let n = 16;
        let barrier = Arc::new(Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (downloads, started, barrier) =
                    (downloads.clone(), started.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    downloads
                        .join_or_start(&h(1), || {
                            // Slow to start: the others arrive meanwhile and must wait.
                            std::thread::sleep(Duration::from_millis(20));
                            fresh(&started)
                        })
                        .unwrap()
                })
            })
            .collect();
        let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(started.load(Ordering::SeqCst), 1, "more than one download");
        assert_eq!(got.iter().filter(|(_, new)| *new).count(), 1);
        assert!(got.iter().all(|(d, _)| Arc::ptr_eq(d, &got[0].0)));
        assert_eq!(
            got[0].0.leases.load(Ordering::SeqCst),
            n,
            "a lease per request"
        );
        // Another blob is another download.
        let (other, new) = downloads.join_or_start(&h(2), || fresh(&started)).unwrap();
        assert!(new && !Arc::ptr_eq(&other, &got[0].0));
        assert_eq!(downloads.len(), 2);
    }

    #[test]
    fn a_finished_download_leaves_the_table_and_the_next_request_starts_afresh() {
        let downloads = Downloads::<Fake>::new();
        let started = AtomicUsize::new(0);
        let (d, _) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        assert!(downloads.is_fetching(&h(1)));
        // Not over: it stays.
        downloads.settle(&h(1), &d, || false);
        assert!(downloads.is_fetching(&h(1)));
        downloads.settle(&h(1), &d, || true);
        assert!(!downloads.is_fetching(&h(1)));
        assert_eq!(downloads.len(), 0);
        let (d2, new) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        assert!(new && !Arc::ptr_eq(&d, &d2));
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_cancelled_or_failed_download_is_replaced_and_its_end_leaves_the_new_one() {
        let downloads = Downloads::<Fake>::new();
        let started = AtomicUsize::new(0);
        let (old, _) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        old.cancelled.store(true, Ordering::SeqCst);
        assert!(
            !downloads.is_fetching(&h(1)),
            "a cancelled download is not joined"
        );
        let (new, started_new) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        assert!(started_new && !Arc::ptr_eq(&old, &new));
        // The old one's thread ends later: the new one must stay in the table.
        downloads.settle(&h(1), &old, || true);
        assert!(downloads.is_fetching(&h(1)));
        let (joined, fresh_one) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        assert!(!fresh_one && Arc::ptr_eq(&joined, &new));
        new.failed.store(true, Ordering::SeqCst);
        let (third, fresh_one) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        assert!(
            fresh_one && !Arc::ptr_eq(&third, &new),
            "a failed download is joined"
        );
        assert_eq!(started.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_start_that_fails_enters_nothing() {
        let downloads = Downloads::<Fake>::new();
        let err = downloads.join_or_start(&h(1), || Err(crate::Error::Remote("no room".into())));
        assert!(err.is_err());
        assert_eq!(downloads.len(), 0);
        assert!(!downloads.is_fetching(&h(1)));
    }

    #[test]
    fn the_drain_waits_for_downloads_being_kept_only() {
        let downloads = Arc::new(Downloads::<Fake>::new());
        let started = AtomicUsize::new(0);
        let (arriving, _) = downloads.join_or_start(&h(1), || fresh(&started)).unwrap();
        // Still arriving: not waited for.
        let t = Instant::now();
        assert_eq!(downloads.drain(Duration::from_secs(10)), 0);
        assert!(t.elapsed() < Duration::from_secs(1));
        // Being kept: waited for until it leaves the table.
        let (kept, _) = downloads.join_or_start(&h(2), || fresh(&started)).unwrap();
        kept.keeping.store(true, Ordering::SeqCst);
        assert_eq!(
            downloads.drain(Duration::from_millis(100)),
            1,
            "bound ran out"
        );
        let ender = {
            let (downloads, kept) = (downloads.clone(), kept.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                downloads.settle(&h(2), &kept, || true);
            })
        };
        let t = Instant::now();
        assert_eq!(downloads.drain(Duration::from_secs(10)), 0);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "the drain did not wait: {:?}",
            t.elapsed()
        );
        ender.join().unwrap();
        assert!(
            downloads.is_fetching(&h(1)),
            "the arriving download is left alone"
        );
        drop(arriving);
    }
}
