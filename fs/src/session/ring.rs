//! The FUSE-over-io_uring transport: per CPU a queue of ring entries, each a header buffer
//! and a payload buffer registered with the kernel, over which requests arrive as
//! completions and answers go back with commit-and-fetch (one system call per batch instead
//! of a read and a write per request).
//!
//! Protocol (Documentation/filesystems/fuse-io-uring.rst, fs/fuse/dev_uring.c): after
//! FUSE_INIT negotiated FUSE_OVER_IO_URING, every queue (one per possible CPU; the kernel
//! queues a request on the queue of the CPU it was issued on) registers its entries with
//! FUSE_IO_URING_CMD_REGISTER; once every queue has one, the kernel sends requests there
//! instead of /dev/fuse. Forgets, interrupts and notifications stay on /dev/fuse, so the
//! classic transport keeps a thread running beside the ring.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::abi::{self, uring};
use super::dispatch::{Dispatcher, Handled, Responder};
use super::reply::{out_header, Reply};
use super::request::InHeader;
use crate::error::Errno;

/// Entries per queue: requests one CPU can have in the daemon at once.
const QUEUE_DEPTH: usize = 8;
/// user_data of the eventfd poll that wakes a queue (deferred answers, stop).
const WAKE: u64 = u64::MAX;

/// A page-aligned, zeroed buffer the kernel reads and writes (it pins the pages).
struct PageBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by one queue thread.
unsafe impl Send for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        let layout = std::alloc::Layout::from_size_align(len.next_multiple_of(4096), 4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(PageBuf { ptr, layout })
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len()) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes it unique on our side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len()) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

struct Ent {
    header: PageBuf,
    payload: PageBuf,
    /// The two iovecs REGISTER points the kernel at; boxed so their address is stable.
    iov: Box<[libc::iovec; 2]>,
    unique: u64,
    commit_id: u64,
    /// What to resubmit when the kernel answers EAGAIN/EINTR.
    last: u32,
}

// SAFETY: the iovecs point into this entry's own buffers.
unsafe impl Send for Ent {}

/// Wakes a queue thread: writes its eventfd.
struct Waker(OwnedFd);

impl Waker {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Answers a request that waited, through the queue that received it.
struct RingResponder {
    tx: Sender<(usize, Reply)>,
    waker: Arc<Waker>,
    idx: usize,
}

impl Responder for RingResponder {
    fn send(self: Box<Self>, r: Reply) {
        if self.tx.send((self.idx, r)).is_ok() {
            self.waker.wake();
        }
    }
}

/// Stops every queue of a ring.
#[derive(Clone, Default)]
pub struct RingStop {
    stop: Arc<AtomicBool>,
    wakers: Arc<std::sync::Mutex<Vec<Arc<Waker>>>>,
}

impl RingStop {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.wakers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            w.wake();
        }
    }
}

/// The CPUs the kernel may queue requests on ("possible", not just online: a queue must
/// exist for each before the kernel switches to the ring).
pub fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map(|m| m + 1)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether the kernel lets FUSE connections use io_uring (module parameter, off by default).
pub fn kernel_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false)
}

fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    c[16..18].copy_from_slice(&qid.to_ne_bytes());
    c
}

/// io-uring's `UringCmd80` sets `addr` but not `len`; FUSE's REGISTER reads the iovec count
/// from `sqe->len` (offset 24 of struct io_uring_sqe), so it is set on the built entry.
fn with_len(e: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C) over two io_uring_sqe halves (128 bytes, asserted above);
    // bytes 24..28 are the first SQE's `len`, a plain u32.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: the same bytes with one integer field changed are a valid Entry128.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// One queue: its ring, entries and thread-local state.
pub struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev: RawFd,
    ents: Vec<Ent>,
    waker: Arc<Waker>,
    tx: Sender<(usize, Reply)>,
    rx: Receiver<(usize, Reply)>,
    stop: Arc<AtomicBool>,
    /// Completions seen while registering, not yet served.
    pending: Vec<(u64, i32)>,
}

impl Queue {
    /// Sets up queue `qid` on the connection `dev` with payload buffers of `payload` bytes.
    pub fn new(qid: u16, dev: RawFd, payload: usize, stop: &RingStop) -> io::Result<Queue> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize((QUEUE_DEPTH as u32 + 1) * 2)
            .build((QUEUE_DEPTH as u32 + 1).next_power_of_two())?;
        // SAFETY: eventfd(2) with constant flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd was just created and is owned by nothing else.
        let waker = Arc::new(Waker(unsafe { OwnedFd::from_raw_fd(efd) }));
        stop.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(waker.clone());
        let mut ents = Vec::with_capacity(QUEUE_DEPTH);
        for _ in 0..QUEUE_DEPTH {
            let mut header = PageBuf::new(uring::REQ_HEADER_LEN)?;
            let mut pl = PageBuf::new(payload.max(uring::MIN_PAYLOAD))?;
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.as_mut_slice().as_mut_ptr().cast(),
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: pl.as_mut_slice().as_mut_ptr().cast(),
                    iov_len: pl.len(),
                },
            ]);
            ents.push(Ent {
                header,
                payload: pl,
                iov,
                unique: 0,
                commit_id: 0,
                last: uring::CMD_REGISTER,
            });
        }
        let (tx, rx) = channel();
        Ok(Queue {
            qid,
            ring,
            dev,
            ents,
            waker,
            tx,
            rx,
            stop: stop.stop.clone(),
            pending: Vec::new(),
        })
    }

    fn push(&mut self, e: squeue::Entry128) -> io::Result<()> {
        // SAFETY: every buffer an entry points at (iovecs, ring buffers) lives in `self.ents`
        // for as long as the ring does.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn push_cmd(&mut self, idx: usize, cmd: u32) -> io::Result<()> {
        let ent = &self.ents[idx];
        let mut b = opcode::UringCmd80::new(types::Fd(self.dev), cmd).cmd(cmd_req(
            self.qid,
            if cmd == uring::CMD_REGISTER {
                0
            } else {
                ent.commit_id
            },
        ));
        if cmd == uring::CMD_REGISTER {
            b = b.addr(Some(ent.iov.as_ptr() as u64));
        }
        let mut e = b.build().user_data(idx as u64);
        if cmd == uring::CMD_REGISTER {
            e = with_len(e, 2);
        }
        self.ents[idx].last = cmd;
        self.push(e)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(self.waker.0.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        // A 64-byte entry in a 128-byte ring: io-uring converts it.
        self.push(e.into())
    }

    /// Registers every entry. Errors the kernel reports at once (bad sizes, io_uring
    /// disabled) come back here; later ones end `run`.
    pub fn register(&mut self) -> io::Result<()> {
        for i in 0..self.ents.len() {
            self.push_cmd(i, uring::CMD_REGISTER)?;
        }
        self.arm_wake()?;
        self.ring.submit()?;
        // A refused REGISTER completes inside the submit; an accepted one only when a
        // request comes, and such a request is kept for `run`.
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for &(ud, res) in &done {
            if res < 0 && ud != WAKE {
                return Err(io::Error::from_raw_os_error(-res));
            }
        }
        self.pending = done;
        Ok(())
    }

    /// Serves requests until the connection ends or the ring is stopped.
    pub fn run(mut self, dispatcher: &Dispatcher) -> io::Result<()> {
        loop {
            let want = if self.pending.is_empty() { 1 } else { 0 };
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let mut done = std::mem::take(&mut self.pending);
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (ud, res) in done {
                if ud == WAKE {
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into a live u64 (non-blocking eventfd).
                    unsafe { libc::read(self.waker.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
                    if self.stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    self.arm_wake()?;
                    continue;
                }
                let idx = ud as usize;
                if res < 0 {
                    match -res {
                        libc::EAGAIN | libc::EINTR => {
                            let last = self.ents[idx].last;
                            self.push_cmd(idx, last)?;
                            continue;
                        }
                        // The connection is gone (unmounted, aborted) or the ring torn down.
                        libc::ENOTCONN | libc::ECANCELED | libc::ENODEV | libc::ECONNABORTED => {
                            return Ok(())
                        }
                        e => return Err(io::Error::from_raw_os_error(e)),
                    }
                }
                self.serve(idx, dispatcher)?;
            }
            while let Ok((idx, r)) = self.rx.try_recv() {
                self.commit(idx, r)?;
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    fn serve(&mut self, idx: usize, dispatcher: &Dispatcher) -> io::Result<()> {
        let ent = &self.ents[idx];
        let hb = ent.header.as_slice();
        let h = InHeader::parse(&hb[uring::IN_OUT_OFFSET..]).unwrap_or_default();
        let commit_id =
            u64::from_ne_bytes(hb[uring::ENT_COMMIT_ID..][..8].try_into().unwrap_or([0; 8]));
        let payload_sz = u32::from_ne_bytes(
            hb[uring::ENT_PAYLOAD_SZ..][..4]
                .try_into()
                .unwrap_or([0; 4]),
        ) as usize;
        let op_len = abi::op_in_len(h.opcode).min(uring::OP_IN_LEN);
        let op_in = &hb[uring::OP_IN_OFFSET..uring::OP_IN_OFFSET + op_len];
        let payload = &ent.payload.as_slice()[..payload_sz.min(ent.payload.len())];
        // Cloned only for a request that waits, not for every request.
        let (tx, waker) = (&self.tx, &self.waker);
        let mut later = || -> Box<dyn Responder> {
            Box::new(RingResponder {
                tx: tx.clone(),
                waker: waker.clone(),
                idx,
            })
        };
        let handled = dispatcher.handle(&h, op_in, payload, &mut later);
        self.ents[idx].unique = h.unique;
        self.ents[idx].commit_id = commit_id;
        match handled {
            Handled::Now(r) => self.commit(idx, r),
            Handled::Later => Ok(()),
            // Nothing that needs no answer comes through the ring; answer anyway so the
            // entry is not lost.
            Handled::Silent => self.commit(idx, Reply::err(Errno::ENOSYS)),
        }
    }

    fn commit(&mut self, idx: usize, mut r: Reply) -> io::Result<()> {
        let ent = &mut self.ents[idx];
        if r.body.len() > ent.payload.len() {
            tracing::error!(len = r.body.len(), "answer larger than the ring buffer");
            r = Reply::err(Errno::EIO);
        }
        ent.payload.as_mut_slice()[..r.body.len()].copy_from_slice(&r.body);
        let h = out_header(ent.unique, r.error, r.body.len());
        let hb = ent.header.as_mut_slice();
        hb[uring::IN_OUT_OFFSET..uring::IN_OUT_OFFSET + h.len()].copy_from_slice(&h);
        hb[uring::ENT_PAYLOAD_SZ..uring::ENT_PAYLOAD_SZ + 4]
            .copy_from_slice(&(r.body.len() as u32).to_ne_bytes());
        self.push_cmd(idx, uring::CMD_COMMIT_AND_FETCH)
    }
}

/// Pins the calling thread to `cpu`: the kernel queues a request on its CPU's queue, so
/// serving it there keeps it on one core. Failure only costs speed.
pub fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET is bounds-checked by the libc macro port.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_entry_carries_the_iovec_count_and_address() {
        let e = opcode::UringCmd80::new(types::Fd(3), uring::CMD_REGISTER)
            .cmd(cmd_req(1, 0))
            .addr(Some(0x1234_5678))
            .build();
        let e = with_len(e, 2);
        // SAFETY: reading the bytes of a repr(C) 128-byte entry.
        let raw: [u8; 128] = unsafe { std::mem::transmute(e) };
        assert_eq!(raw[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(
            u64::from_ne_bytes(raw[16..24].try_into().unwrap()),
            0x1234_5678
        );
        assert_eq!(u32::from_ne_bytes(raw[24..28].try_into().unwrap()), 2);
        // the command area starts at offset 48: commit_id at +8, qid at +16
        assert_eq!(u16::from_ne_bytes(raw[64..66].try_into().unwrap()), 1);
        // cmd_op sits at offset 8 (the union with `off`)
        assert_eq!(
            u32::from_ne_bytes(raw[8..12].try_into().unwrap()),
            uring::CMD_REGISTER
        );
    }

    #[test]
    fn possible_cpus_counts_from_sysfs() {
        assert!(possible_cpus() >= 1);
    }
}
