//! The daemon's control socket (`<store>/control.sock`): maintenance commands on a live
//! mount, one JSON request and one JSON answer per connection. The same handler serves an
//! unmounted store in the command's own process, so both paths behave the same.
//!
//! - `protocol`: the messages, one set of types for both ends;
//! - `handler`: what each request does to a store;
//! - `server`: the daemon's socket (transport, shutdown);
//! - `client`: the command's side of the socket.

mod client;
mod handler;
mod protocol;
mod server;

use std::path::{Path, PathBuf};

pub use client::{call, call_with_progress, is_leaving, is_unanswered, Leaving};
pub use handler::handle;
pub use protocol::{command_settings, LimitsMsg, Reply, Request, Secret};
pub use server::serve;

pub fn socket_path(store: &Path) -> PathBuf {
    store.join("control.sock")
}
