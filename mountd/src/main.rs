//! The `kcache` binary: parses the command line and maps errors to exit codes.

mod admin;
mod cli;
mod commands;
mod control;
mod daemon;
mod helper;
mod holder;
mod import;
mod metrics;
mod mountinfo;
mod serve;
mod sync;

use std::process::ExitCode;

fn main() -> ExitCode {
    if helper::invoked_as_helper() {
        return helper::run();
    }
    let args = cli::parse();
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kcache: {e:#}");
            ExitCode::from(1)
        }
    }
}
