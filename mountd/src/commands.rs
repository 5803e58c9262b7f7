//! Dispatch of the subcommands; umount and verify live here, maintenance in `admin`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kcache_store::Store;

use crate::admin::{self, human};
use crate::cli::{default_store, Cli, Command};
use crate::{daemon, mountinfo};

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Mount(args) => daemon::mount(args),
        Command::Umount { mountpoint, lazy } => umount(&mountpoint, lazy),
        Command::Stats { at, json } => admin::stats(&at, json),
        Command::Quota {
            store,
            low_watermark,
            min_free,
            json,
            args,
        } => admin::quota(store, low_watermark, min_free, json, &args),
        Command::Evict { at, to } => admin::evict(&at, to),
        Command::Clean { at, older_than } => admin::clean(&at, older_than),
        Command::Gc { at, json } => admin::gc(&at, json),
        Command::Clear { vol, yes, path } => admin::clear(&vol, path.as_deref(), yes),
        Command::Pin { vol, paths } => admin::pin(&vol, &paths, true),
        Command::Unpin { vol, paths } => admin::pin(&vol, &paths, false),
        Command::Pins { vol, json, path } => admin::pins(&vol, path.as_deref(), json),
        Command::Du {
            vol,
            depth,
            json,
            path,
        } => admin::du(&vol, path.as_deref(), depth, json),
        Command::Import { vol, src, dest } => crate::import::import(&vol, &src, &dest),
        Command::Push {
            store,
            volume,
            tag,
            sign,
            replace,
            upstream,
        } => admin::push(store, volume, tag, sign, replace, upstream),
        Command::Pull {
            store,
            volume,
            trusted_keys,
            source,
            theirs,
            replace,
        } => {
            let mode = if replace {
                kcache_store::PullMode::Replace
            } else {
                kcache_store::PullMode::Merge { theirs }
            };
            admin::pull(store, volume, trusted_keys, source, mode)
        }
        Command::Prefetch { paths } => crate::import::prefetch(&paths),
        Command::Keygen { out } => admin::keygen(&out),
        Command::Serve { store, listen } => {
            crate::serve::serve(&store.unwrap_or_else(default_store), &listen)
        }
        Command::Install { dir, force } => crate::helper::install(&dir, force),
        Command::Volume { store, cmd } => admin::volume(store, cmd),
        Command::Verify { store, json } => verify(&store.unwrap_or_else(default_store), json),
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
    // The daemon commits what this mount left open, then drops it from its list; when it was
    // the last mount, the daemon exits and lets go of the store lock. Wait for either.
    let store = Path::new(&entry.source);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = match crate::control::call(store, &crate::control::Request::Mounts) {
            Ok(crate::control::Reply::Mounts(list)) => Some(list),
            _ => None,
        };
        match listed {
            Some(list) if !list.iter().any(|m| m.mountpoint == mp) && !list.is_empty() => {
                return Ok(ExitCode::SUCCESS)
            }
            Some(_) => {}
            None => match Store::open_lock_probe(store) {
                Ok(true) | Err(_) => return Ok(ExitCode::SUCCESS),
                Ok(false) => {}
            },
        }
        if Instant::now() > deadline {
            bail!("daemon for {} still busy after 120 s", mp.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens an existing store as its owner, for maintenance that needs it unmounted.
fn open_unmounted(store: &Path, purpose: &str) -> Result<Store> {
    if !store.join("kcache.db").exists() {
        bail!("{} is not a kcache store (no kcache.db)", store.display());
    }
    let open = || {
        Store::open(store).with_context(|| {
            format!(
                "opening store {} for {purpose} (unmount it first)",
                store.display()
            )
        })
    };
    // A daemon on its way out is waited for; one that serves the store is not.
    let deadline = Instant::now() + crate::holder::settle_bound();
    match crate::holder::route(store, deadline, &open)? {
        crate::holder::Route::Offline(s) => Ok(*s),
        crate::holder::Route::Daemon => bail!(
            "store {} is mounted; unmount it for {purpose}",
            store.display()
        ),
    }
}

fn verify(store: &Path, json: bool) -> Result<ExitCode> {
    let s = open_unmounted(store, "verification")?;
    let report = s.blobs().verify(|_, _| {})?;
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
