//! kcache's filesystem: POSIX semantics over the content-addressed store (`core`), and the
//! thin fuser adapter that serves it to the kernel (`fuse`).

pub mod admin;
pub mod core;
pub mod error;
pub mod evict;
pub mod fuse;
pub mod requests;

pub use crate::core::{
    Attr, Backing, BackingToken, Ctx, IoMode, KcacheFs, KernelCache, Opened, SetAttrIn, Shared,
    TimeSet, ROOT_INO,
};
pub use crate::error::{Errno, Result};
pub use crate::fuse::{KcacheFuse, NotifierCache};
pub use crate::requests::{Op, RequestCounts};
