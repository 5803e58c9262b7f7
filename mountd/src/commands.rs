//! The subcommands other than `mount`: umount, stats, verify.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kcache_store::{OpenOptionsStore, Store};

use crate::cli::{default_store, Cli, Command};
use crate::{daemon, mountinfo};

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Mount(args) => daemon::mount(args),
        Command::Umount { mountpoint, lazy } => umount(&mountpoint, lazy),
        Command::Stats { store, json } => stats(&store.unwrap_or_else(default_store), json),
        Command::Verify { store, json } => verify(&store.unwrap_or_else(default_store), json),
        Command::Evict { store, to } => evict(&store.unwrap_or_else(default_store), to),
    }
}

fn umount(mp: &Path, lazy: bool) -> Result<ExitCode> {
    let mp = mp.canonicalize().unwrap_or_else(|_| mp.to_owned());
    let Some(entry) = mountinfo::mount_at(&mp) else {
        bail!("{} is not mounted", mp.display());
    };
    if entry.fstype != "fuse.kcache" && !Path::new(&entry.source).join("kcache.db").exists() {
        bail!("{} is a {} mount, not kcache", mp.display(), entry.fstype);
    }
    daemon::unmount_path(&mp, lazy)?;
    if lazy {
        return Ok(ExitCode::SUCCESS);
    }
    // The daemon holds the store lock until its last commit is done; wait for it to let go.
    let store = Path::new(&entry.source);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match Store::open_lock_probe(store) {
            Ok(true) => return Ok(ExitCode::SUCCESS),
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(false) => bail!("daemon for {} still running after 120 s", mp.display()),
            Err(_) => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn stats(store: &Path, json: bool) -> Result<ExitCode> {
    let s = Store::open_with(store, &OpenOptionsStore { read_only: true })
        .with_context(|| format!("opening store {}", store.display()))?;
    let st = s.stats()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!("store:          {}", store.display());
        println!("files:          {}", st.files);
        println!("directories:    {}", st.directories);
        println!("symlinks:       {}", st.symlinks);
        println!(
            "logical bytes:  {} ({})",
            st.logical_bytes,
            human(st.logical_bytes)
        );
        println!(
            "stored bytes:   {} ({})",
            st.stored_bytes,
            human(st.stored_bytes)
        );
        println!("blobs:          {}", st.blobs);
        println!(
            "dedup savings:  {} ({})",
            st.dedup_saved_bytes,
            human(st.dedup_saved_bytes)
        );
        if st.quarantined_blobs > 0 {
            println!("quarantined:    {}", st.quarantined_blobs);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens an existing store as its owner, for maintenance that needs it unmounted.
fn open_unmounted(store: &Path, purpose: &str) -> Result<Store> {
    if !store.join("kcache.db").exists() {
        bail!("{} is not a kcache store (no kcache.db)", store.display());
    }
    Store::open(store).with_context(|| {
        format!(
            "opening store {} for {purpose} (unmount it first)",
            store.display()
        )
    })
}

fn verify(store: &Path, json: bool) -> Result<ExitCode> {
    let s = open_unmounted(store, "verification")?;
    let report = s.verify(|_, _| {})?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("checked {} blobs ({})", report.checked, human(report.bytes));
        for h in &report.quarantined {
            println!("quarantined: {h}");
        }
        for h in &report.missing {
            println!("missing: {h}");
        }
        if report.stray_removed > 0 {
            println!("removed {} stray blob files", report.stray_removed);
        }
        if report.bad_refcounts > 0 {
            println!(
                "blobs with wrong reference counts: {}",
                report.bad_refcounts
            );
        }
        println!(
            "{}",
            if report.is_clean() {
                "store is clean"
            } else {
                "store has problems"
            }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn evict(store: &Path, to: u64) -> Result<ExitCode> {
    let s = open_unmounted(store, "eviction")?;
    let ev = s.evict_to(to, |_| Some(()))?;
    let left = s.stored_bytes()?;
    println!(
        "evicted {} blobs ({}), {} names; {} stored",
        ev.blobs,
        human(ev.bytes),
        ev.names.len(),
        human(left)
    );
    Ok(ExitCode::SUCCESS)
}
