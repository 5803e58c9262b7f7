//! kcache's filesystem: POSIX semantics over the content-addressed store (`core`), and the
//! FUSE session layer that serves it to the kernel over /dev/fuse or io_uring (`session`).

mod access;
pub mod admin;
pub mod core;
pub mod error;
pub mod evict;
mod names;
mod open_table;
pub mod requests;
pub mod session;
mod staging;
mod types;

pub use crate::core::{
    Attr, Backing, BackingToken, Ctx, IoMode, KcacheFs, KernelCache, Opened, SetAttrIn, Shared,
    TimeSet, ROOT_INO,
};
pub use crate::error::{Errno, Result};
pub use crate::requests::{Op, RequestCounts};
pub use crate::session::{Session, SessionConfig, Transport, UringChoice};
