//! kcache's own FUSE session layer: mount, the INIT handshake, and two transports (classic
//! /dev/fuse read/write, and FUSE over io_uring) feeding one `Dispatcher`.
//!
//! Why not fuser: fuser has no io_uring transport and keeps its request decoding private,
//! so a ring path would need a second decoder and a second copy of every handler. Owning
//! the protocol layer (`abi`, `request`, `reply`) keeps one decoder and one dispatch path
//! for both transports; see ARCHITECTURE.md.

pub mod abi;
pub mod dev;
pub mod dispatch;
pub mod mount;
pub mod reply;
pub mod request;
pub mod ring;

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::core::{KcacheFs, KernelCache};
use dev::Dev;
use dispatch::{Dispatcher, Handled, Responder};
use reply::Reply;
use request::{decode, split_classic, Operation};

pub use mount::MountOptions;

/// Which transport carries a mount's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// read(2) and write(2) on /dev/fuse: two system calls and two context switches per
    /// request.
    Classic,
    /// FUSE over io_uring (Linux 6.14+, `enable_uring` on).
    IoUring,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Classic => "classic",
            Transport::IoUring => "io_uring",
        }
    }
}

/// What the operator asked for (`-o io_uring` / `-o noio_uring`, or neither).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UringChoice {
    /// io_uring when the kernel offers it, else classic.
    #[default]
    Auto,
    /// io_uring or fail the mount.
    Force,
    /// Classic only.
    Off,
}

/// How to serve a mount.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub mount: MountOptions,
    /// Request threads of the classic transport.
    pub threads: usize,
    pub uring: UringChoice,
    pub passthrough: bool,
}

/// A mounted FUSE connection, not yet served.
pub struct Session {
    dev: Arc<Dev>,
    dispatcher: Arc<Dispatcher>,
    config: SessionConfig,
}

/// Invalidates kernel dentries and inodes through /dev/fuse (used after eviction, from a
/// daemon thread, never from inside a request handler; `attrs_changed` alone may be).
pub struct Notifier(Arc<Dev>);

impl KernelCache for Notifier {
    fn name_gone(&self, parent: u64, name: &OsStr, ino: u64) {
        // ENOENT just means the kernel had nothing cached.
        let _ = self.0.inval_entry(parent, name);
        let _ = self.0.inval_inode(ino);
    }

    fn pages_changed(&self, ino: u64) {
        if let Err(e) = self.0.inval_inode(ino) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(ino, error = %e, "telling the kernel to drop a file's pages");
            }
        }
    }

    fn attrs_changed(&self, ino: u64) {
        // ENOENT: the kernel holds nothing for it.
        if let Err(e) = self.0.inval_attrs(ino) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(ino, error = %e, "telling the kernel of changed attributes");
            }
        }
    }
}

/// Answers on /dev/fuse, from whichever thread.
struct DevResponder {
    dev: Arc<Dev>,
    unique: u64,
}

impl Responder for DevResponder {
    fn send(self: Box<Self>, r: Reply) {
        if let Err(e) = self.dev.reply(self.unique, &r) {
            tracing::warn!(error = %e, "answering a request that waited");
        }
    }
}

/// The request buffer: the largest write plus its headers.
fn buf_len() -> usize {
    dispatch::MAX_WRITE as usize + 4096
}

impl Session {
    /// Mounts `fs` at `mountpoint`. Forcing io_uring fails here, before mounting, when the
    /// kernel does not allow it.
    pub fn mount(
        fs: Arc<KcacheFs>,
        mountpoint: &Path,
        config: SessionConfig,
    ) -> io::Result<Session> {
        if config.uring == UringChoice::Force && !ring::kernel_enabled() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring was asked for (-o io_uring) but the kernel does not allow it: \
                 /sys/module/fuse/parameters/enable_uring is not Y (needs Linux 6.14+; \
                 see README, \"FUSE over io_uring\")",
            ));
        }
        let dev = Arc::new(mount::mount(mountpoint, &config.mount)?);
        let dispatcher = Arc::new(Dispatcher::new(fs, dev.clone(), config.passthrough));
        Ok(Session {
            dev,
            dispatcher,
            config,
        })
    }

    pub fn notifier(&self) -> Notifier {
        Notifier(self.dev.clone())
    }

    /// Serves the mount until it is unmounted.
    pub fn run(self) -> io::Result<()> {
        let fs = self.dispatcher.fs().clone();
        let mut buf = vec![0u8; buf_len()];
        let negotiated = loop {
            let Some(n) = self.dev.read(&mut buf)? else {
                return Ok(());
            };
            let (h, op_in, payload) = match split_classic(&buf[..n]) {
                Ok(p) => p,
                Err(_) => continue,
            };
            let op = decode(&h, op_in, payload);
            match op {
                Ok(op @ Operation::Init { .. }) => {
                    let uring = self.config.uring != UringChoice::Off;
                    match self.dispatcher.init(&op, uring) {
                        Ok((r, neg)) => {
                            self.dev.reply(h.unique, &r)?;
                            if neg.max_write != 0 {
                                break neg;
                            }
                        }
                        Err(r) => {
                            self.dev.reply(h.unique, &r)?;
                            return Err(io::Error::other("FUSE_INIT refused"));
                        }
                    }
                }
                _ => {
                    self.dev.reply(h.unique, &Reply::err(crate::Errno::EIO))?;
                }
            }
        };

        // The ring, when asked for and offered: every queue registers, or none is used.
        let stop = ring::RingStop::default();
        let mut threads = Vec::new();
        let mut transport = Transport::Classic;
        if negotiated.uring {
            match self.start_ring(&stop, negotiated.max_write as usize) {
                Ok(t) => {
                    threads = t;
                    transport = Transport::IoUring;
                }
                Err(e) => {
                    stop.stop();
                    if self.config.uring == UringChoice::Force {
                        tracing::error!(error = %e, "io_uring setup failed and was forced; unmounting");
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "io_uring setup failed; serving over /dev/fuse");
                }
            }
        } else if self.config.uring == UringChoice::Force {
            return Err(io::Error::other(
                "io_uring was asked for but the kernel did not offer it in FUSE_INIT",
            ));
        }
        fs.set_transport(transport.as_str());
        tracing::info!(transport = transport.as_str(), "fuse transport");

        // Classic threads: all requests without the ring; with it, the forgets and
        // interrupts the kernel still sends through /dev/fuse (one thread is plenty).
        let n = match transport {
            Transport::Classic => self.config.threads.max(1),
            Transport::IoUring => 1,
        };
        for i in 1..n {
            let dev = match self.dev.clone_dev() {
                Ok(d) => Arc::new(d),
                Err(e) => {
                    tracing::warn!(error = %e, "cloning /dev/fuse; sharing one descriptor");
                    self.dev.clone()
                }
            };
            let d = self.dispatcher.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || classic_loop(&dev, &d));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::warn!(error = %e, "starting a request thread"),
            }
        }
        let r = classic_loop(&self.dev, &self.dispatcher);
        stop.stop();
        for t in threads {
            let _ = t.join();
        }
        r
    }

    fn start_ring(
        &self,
        stop: &ring::RingStop,
        max_write: usize,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        let nq = ring::possible_cpus();
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        for qid in 0..nq {
            let (d, dev, stop, tx) = (
                self.dispatcher.clone(),
                self.dev.clone(),
                stop.clone(),
                tx.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("fuse-ring-{qid}"))
                .spawn(move || {
                    ring::pin_to(qid);
                    let q = ring::Queue::new(qid as u16, dev.raw(), max_write, &stop)
                        .and_then(|mut q| q.register().map(|()| q));
                    match q {
                        Ok(q) => {
                            let _ = tx.send(Ok(()));
                            // Handler panics are answered EIO by the dispatcher; one that
                            // still escapes leaves this queue's entries with nobody to serve
                            // them, and the kernel keeps routing this CPU's requests there: a
                            // hang no process can leave. Dying is better: the mount fails with
                            // ENOTCONN and a restart recovers it (the crash contract).
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                q.run(&d)
                            }))
                            .unwrap_or_else(|_| {
                                tracing::error!(qid, "io_uring queue thread panicked; aborting");
                                std::process::abort()
                            });
                            if let Err(e) = &r {
                                tracing::error!(qid, error = %e, "io_uring queue failed");
                            }
                            // Keep the device open until the ring is gone.
                            drop(dev);
                            r
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            Ok(())
                        }
                    }
                })?;
            threads.push(t);
        }
        drop(tx);
        for _ in 0..nq {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stop.stop();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(io::Error::new(
                        e.kind(),
                        format!("registering ring entries: {e}"),
                    ));
                }
                Err(_) => return Err(io::Error::other("a ring thread died while starting")),
            }
        }
        Ok(threads)
    }
}

/// Reads and answers requests on one /dev/fuse descriptor until the connection ends.
fn classic_loop(dev: &Arc<Dev>, d: &Dispatcher) -> io::Result<()> {
    let mut buf = vec![0u8; buf_len()];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "reading /dev/fuse");
                return Err(e);
            }
        };
        let (h, op_in, payload) = match split_classic(&buf[..n]) {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(len = n, "short request from the kernel");
                continue;
            }
        };
        let unique = h.unique;
        let mut later = || -> Box<dyn Responder> {
            Box::new(DevResponder {
                dev: dev.clone(),
                unique,
            })
        };
        match d.handle(&h, op_in, payload, &mut later) {
            Handled::Now(r) => {
                if let Err(e) = dev.reply(unique, &r) {
                    if e.raw_os_error() == Some(libc::ENODEV) {
                        return Ok(());
                    }
                    tracing::warn!(error = %e, opcode = h.opcode, "answering a request");
                }
            }
            Handled::Later | Handled::Silent => {}
        }
    }
}
