//! Maintenance commands (stats, quota, evict, clean, gc, clear, pin, du, import). Each talks
//! to the daemon over its control socket when the store is mounted, and otherwise opens the
//! store itself and runs the same request handler.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kcache_fs::KcacheFs;
use kcache_store::{OpenOptionsStore, PushProgress, Store};

use crate::cli::{default_store, parse_size, StoreAt, VolumeAt, VolumeCmd};
use crate::control::{self, LimitsMsg, Reply, Request};
use crate::holder;
use crate::mountinfo;

pub fn human(n: u64) -> String {
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

/// The kcache mount holding `path`, and `path` relative to the volume root.
fn locate_in_mount(path: &Path) -> Result<(mountinfo::MountEntry, String)> {
    let canon = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    let Some(m) = mountinfo::kcache_mount_of(&canon) else {
        bail!(
            "{} is not inside a kcache mount (give --store to name a store and a path inside its volume)",
            path.display()
        );
    };
    let rel = canon.strip_prefix(&m.mountpoint).unwrap_or(Path::new(""));
    let vpath = Path::new(&m.root).join(rel).display().to_string();
    Ok((m, vpath))
}

/// Store of a store-wide command.
fn store_at(at: &StoreAt) -> Result<PathBuf> {
    match (&at.store, &at.mountpoint) {
        (Some(s), _) => Ok(s.clone()),
        (None, Some(mp)) => Ok(PathBuf::from(locate_in_mount(mp)?.0.source)),
        (None, None) => Ok(default_store()),
    }
}

/// Store, volume (None: the mounted one) and volume path for a path-based command.
fn locate(vol: &VolumeAt, path: Option<&Path>) -> Result<(PathBuf, Option<String>, String)> {
    match &vol.store {
        Some(s) => Ok((
            s.clone(),
            Some(vol.volume.clone()),
            path.map(|p| p.display().to_string()).unwrap_or_default(),
        )),
        None => {
            let p = path.unwrap_or(Path::new("."));
            let (m, vpath) = locate_in_mount(p)?;
            let store = PathBuf::from(m.source);
            // Which volume: the daemon knows each of its mounts by device number, which a
            // bind mount (a container's view) keeps.
            let dev = std::fs::metadata(p)
                .map(|md| std::os::unix::fs::MetadataExt::dev(&md))
                .ok();
            let volume = match control::call(&store, &Request::Mounts) {
                Ok(Reply::Mounts(list)) => list
                    .into_iter()
                    .find(|mi| Some(mi.dev) == dev)
                    .map(|mi| mi.volume),
                _ => None,
            };
            Ok((store, volume, vpath))
        }
    }
}

/// Takes the reply a request gives out of `reply`, or says the answer does not fit it.
macro_rules! expect {
    ($reply:expr, $pat:pat => $out:expr) => {
        match $reply {
            $pat => $out,
            other => bail!("unexpected answer ({}) from the store", other.kind()),
        }
    };
}

/// Runs a request against the daemon of `store`, or against the unmounted store directly.
fn request(store: &Path, volume: Option<&str>, req: Request) -> Result<Reply> {
    request_with_progress(store, volume, req, &mut |_| {})
}

/// Opens an unmounted store for a command: read-only for questions (no lock, so it never
/// holds up a mount that starts meanwhile), as its owner otherwise.
fn open_for(store: &Path, req: &Request) -> Result<Store> {
    if !store.join("kcache.db").exists() {
        bail!("{} is not a kcache store (no kcache.db)", store.display());
    }
    let read_only = matches!(req, Request::Stats);
    Store::open_with(store, &OpenOptionsStore { read_only })
        .with_context(|| format!("opening store {}", store.display()))
}

/// Like `request`, passing progress reports of long requests to `progress`.
fn request_with_progress(
    store: &Path,
    volume: Option<&str>,
    req: Request,
    progress: &mut dyn FnMut(&PushProgress),
) -> Result<Reply> {
    let open = || open_for(store, &req);
    let mut offline = |s: Store, progress: &mut dyn FnMut(&PushProgress)| -> Result<Reply> {
        let read_only = s.is_read_only();
        // The volume a mount would take by default: the first one.
        let vol = match volume {
            Some(v) => s
                .volume(v, false, 0, 0)
                .with_context(|| format!("store {}", store.display()))?,
            None => match s.volumes()?.into_iter().next() {
                Some(v) => v,
                None if read_only => bail!("store {} has no volume yet", store.display()),
                None => s.volume("default", true, 0, 0)?,
            },
        };
        let s = Arc::new(s);
        let fs = KcacheFs::new(s.clone(), vol, read_only);
        control::handle(&fs, &s, &[], req.clone(), progress).map_err(|e| anyhow::anyhow!(e))
    };
    holder::run(store, &req, progress, &open, &mut offline)
}

pub fn stats(at: &StoreAt, json: bool) -> Result<ExitCode> {
    let store = store_at(at)?;
    // Live or not, the same handler answers: an unmounted store is opened here for it.
    let v = expect!(request(&store, None, Request::Stats)?, Reply::Stats(v) => v);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let st = &v.store;
    let bytes = |n: u64| format!("{n} ({})", human(n));
    if let Some(why) = &v.halted {
        println!("HALTED:           takes no more changes: {why}");
    }
    println!("store:            {}", store.display());
    println!("volume:           {}", v.volume);
    println!("files:            {}", st.files);
    println!("directories:      {}", st.directories);
    println!("symlinks:         {}", st.symlinks);
    println!("logical bytes:    {}", bytes(st.logical_bytes));
    println!("stored bytes:     {}", bytes(st.stored_bytes));
    println!("on disk:          {}", bytes(st.disk_bytes));
    println!("blobs:            {}", st.blobs);
    println!("dedup savings:    {}", bytes(st.dedup_saved_bytes));
    println!("usage:            {}", bytes(st.usage_bytes));
    match st.quota_bytes {
        Some(q) => {
            println!("quota:            {}", bytes(q));
            if let Some(l) = st.low_watermark_bytes {
                println!("low watermark:    {}", bytes(l));
            }
        }
        None => println!("quota:            none"),
    }
    println!(
        "min free on disk: {} ({})",
        st.min_free,
        human(v.min_free_bytes)
    );
    println!("disk available:   {}", bytes(v.disk_available_bytes));
    println!("transport:        {}", v.transport);
    println!(
        "pinned:           {} in {} pins",
        bytes(st.pinned_bytes),
        st.pins
    );
    println!(
        "evictions:        {} ({})",
        st.evictions,
        human(st.evicted_bytes)
    );
    println!("opens:            {}", st.opens);
    println!("bytes read:       {}", bytes(st.bytes_read));
    println!("bytes written:    {}", bytes(st.bytes_written));
    if st.quarantined_blobs > 0 {
        println!("quarantined:      {}", st.quarantined_blobs);
    }
    for s in &v.sync {
        let ago = |t: Option<i64>| match t {
            Some(t) => {
                let secs = (kcache_store::now_ns() - t).max(0) / 1_000_000_000;
                format!("{secs} s ago")
            }
            None => "never".into(),
        };
        let what = match s.kind {
            kcache_store::SyncKind::Push => format!(
                "push {} -> {}:{}: {} blobs queued ({}), {} uploaded ({}), last publish {}",
                s.volume,
                s.url,
                s.tag,
                s.queued_blobs,
                human(s.queued_bytes),
                s.blobs_moved,
                human(s.bytes_moved),
                ago(s.last_ok_ns)
            ),
            kcache_store::SyncKind::Follow => format!(
                "follow {}:{} -> {}: {} names merged in, last merge {}",
                s.url,
                s.tag,
                s.volume,
                s.blobs_moved,
                ago(s.last_ok_ns)
            ),
        };
        println!("{what}; {} errors", s.errors);
        if let Some(e) = &s.last_error {
            println!("  last error: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn quota(
    store: Option<PathBuf>,
    low_watermark: Option<u8>,
    min_free: Option<kcache_store::MinFree>,
    json: bool,
    args: &[String],
) -> Result<ExitCode> {
    let (store, size) = match (store, args) {
        (Some(s), [size]) => (s, Some(size.as_str())),
        (Some(s), []) => (s, None),
        (None, [mp]) => (
            PathBuf::from(locate_in_mount(Path::new(mp))?.0.source),
            None,
        ),
        (None, [mp, size]) => (
            PathBuf::from(locate_in_mount(Path::new(mp))?.0.source),
            Some(size.as_str()),
        ),
        (None, []) => (default_store(), None),
        _ => bail!("usage: kcache quota MOUNTPOINT [SIZE|none] (or --store DIR [SIZE|none])"),
    };
    let current: LimitsMsg = expect!(
        request(&store, None, Request::Limits { set: None })?,
        Reply::Limits(l) => l
    );
    let mut new = current.clone();
    if let Some(s) = size {
        new.quota = match s {
            "none" | "off" | "0" => None,
            s => Some(parse_size(s).map_err(|e| anyhow::anyhow!(e))?),
        };
    }
    if let Some(p) = low_watermark {
        new.low_watermark_pct = p;
    }
    if let Some(m) = min_free {
        new.min_free = m.to_string();
    }
    let shown: LimitsMsg = if size.is_some() || low_watermark.is_some() || min_free.is_some() {
        expect!(
            request(&store, None, Request::Limits { set: Some(new) })?,
            Reply::Limits(l) => l
        )
    } else {
        current
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        match shown.quota {
            Some(q) => println!(
                "quota {} ({q} bytes), evicting down to {}%; keeping {} free on disk",
                human(q),
                shown.low_watermark_pct,
                min_free_text(&shown.min_free)
            ),
            None => println!(
                "no quota; keeping {} free on disk",
                min_free_text(&shown.min_free)
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn min_free_text(m: &str) -> String {
    match m.parse::<u64>() {
        Ok(b) => human(b),
        Err(_) => m.to_owned(),
    }
}

fn print_evicted(r: Reply) -> Result<()> {
    let v = expect!(r, Reply::Evicted(v) => v);
    println!(
        "evicted {} blobs ({}), {} names; {} stored",
        v.blobs,
        human(v.bytes),
        v.names,
        human(v.usage_bytes)
    );
    Ok(())
}

pub fn evict(at: &StoreAt, to: u64) -> Result<ExitCode> {
    let store = store_at(at)?;
    let v = request(
        &store,
        None,
        Request::Evict {
            to: Some(to),
            older_than_secs: None,
        },
    )?;
    print_evicted(v)?;
    Ok(ExitCode::SUCCESS)
}

pub fn clean(at: &StoreAt, older_than: u64) -> Result<ExitCode> {
    let store = store_at(at)?;
    let v = request(
        &store,
        None,
        Request::Evict {
            to: None,
            older_than_secs: Some(older_than),
        },
    )?;
    print_evicted(v)?;
    Ok(ExitCode::SUCCESS)
}

pub fn gc(at: &StoreAt, json: bool) -> Result<ExitCode> {
    let store = store_at(at)?;
    let v = expect!(request(&store, None, Request::Gc)?, Reply::Gc(v) => v);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "purged {} unlinked inodes, removed {} dead and {} stray blob files ({}); database log {} -> {}",
            v.purged_inodes,
            v.dead_blobs_removed,
            v.stray_files_removed,
            human(v.stray_bytes),
            human(v.wal_bytes_before),
            human(v.wal_bytes_after),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; refuses without one.
fn confirm(what: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to remove {what} without --yes (no terminal to ask on)");
    }
    eprint!("Remove {what}? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

pub fn volume(store: Option<PathBuf>, cmd: VolumeCmd) -> Result<ExitCode> {
    let store = store.unwrap_or_else(default_store);
    match cmd {
        VolumeCmd::Create { name } => {
            let created = expect!(
                request(&store, None, Request::VolumeCreate { name: name.clone() })?,
                Reply::VolumeCreated { created } => created
            );
            println!("created volume {created}");
        }
        VolumeCmd::List { json } => {
            let v = expect!(request(&store, None, Request::VolumeList)?, Reply::Volumes(v) => v);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:>10} {:>12}", "volume", "files", "logical");
                for e in &v {
                    println!(
                        "{:<24} {:>10} {:>12}",
                        e.name,
                        e.files,
                        human(e.logical_bytes)
                    );
                }
            }
        }
        VolumeCmd::Rm { yes, name } => {
            if !yes && !confirm(&format!("volume '{name}' and everything in it"))? {
                eprintln!("nothing removed");
                return Ok(ExitCode::from(1));
            }
            let files = expect!(
                request(&store, None, Request::VolumeRm { name: name.clone() })?,
                Reply::VolumeRemoved { files, .. } => files
            );
            println!("removed volume {name} ({files} files)");
        }
        VolumeCmd::Clone { src, dst } => {
            let seconds = expect!(
                request(
                    &store,
                    None,
                    Request::VolumeClone {
                        src: src.clone(),
                        dst: dst.clone(),
                    },
                )?,
                Reply::VolumeCloned { seconds, .. } => seconds
            );
            println!("cloned volume {src} to {dst} in {seconds:.3} s");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clear(vol: &VolumeAt, path: Option<&Path>, yes: bool) -> Result<ExitCode> {
    let (store, volume, vpath) = locate(vol, path)?;
    if !yes {
        let what = match path {
            Some(p) => format!("everything in {}", p.display()),
            None => format!("the whole volume '{}' of {}", vol.volume, store.display()),
        };
        if !confirm(&what)? {
            eprintln!("nothing removed");
            return Ok(ExitCode::from(1));
        }
    }
    let removed = expect!(
        request(
            &store,
            volume.as_deref(),
            Request::Clear {
                volume: volume.clone(),
                path: vpath,
            },
        )?,
        Reply::Cleared { removed } => removed
    );
    println!("removed {removed} names");
    Ok(ExitCode::SUCCESS)
}

/// Volume paths of several paths, all in one store.
fn locate_all(vol: &VolumeAt, paths: &[PathBuf]) -> Result<(PathBuf, Option<String>, Vec<String>)> {
    let mut out = Vec::new();
    let mut store_vol: Option<(PathBuf, Option<String>)> = None;
    for p in paths {
        let (s, v, vp) = locate(vol, Some(p))?;
        match &store_vol {
            Some((s0, v0)) if *s0 != s || *v0 != v => bail!(
                "{} is in another store or volume than the other paths; give them one at a time",
                p.display()
            ),
            _ => store_vol = Some((s, v)),
        }
        out.push(vp);
    }
    let (s, v) = store_vol.context("no paths given")?;
    Ok((s, v, out))
}

pub fn pin(vol: &VolumeAt, paths: &[PathBuf], on: bool) -> Result<ExitCode> {
    let (store, volume, vpaths) = locate_all(vol, paths)?;
    let req = if on {
        Request::Pin {
            volume: volume.clone(),
            paths: vpaths,
        }
    } else {
        Request::Unpin {
            volume: volume.clone(),
            paths: vpaths,
        }
    };
    match request(&store, volume.as_deref(), req)? {
        Reply::Pinned { pinned_bytes } if on => {
            println!("pinned; {} pinned in total", human(pinned_bytes))
        }
        Reply::Unpinned { .. } if !on => {}
        other => bail!("unexpected answer ({}) from the store", other.kind()),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pins(vol: &VolumeAt, path: Option<&Path>, json: bool) -> Result<ExitCode> {
    let (store, volume, _) = locate(vol, path)?;
    let v = expect!(
        request(
            &store,
            volume.as_deref(),
            Request::Pins {
                volume: volume.clone(),
            },
        )?,
        Reply::Pins(v) => v
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &v.pins {
            println!("{p}");
        }
        println!("pinned: {}", human(v.pinned_bytes));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn du(vol: &VolumeAt, path: Option<&Path>, depth: u32, json: bool) -> Result<ExitCode> {
    let (store, volume, vpath) = locate(vol, path)?;
    let v = expect!(
        request(
            &store,
            volume.as_deref(),
            Request::Du {
                volume: volume.clone(),
                path: vpath.clone(),
                depth,
            },
        )?,
        Reply::Du(v) => v
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let base = path.map(|p| p.display().to_string()).unwrap_or(vpath);
    println!(
        "{:>12} {:>12} {:>12} {:>9}  path",
        "logical", "stored", "on disk", "files"
    );
    for e in &v {
        let rel = &e.path;
        let shown = if rel.is_empty() {
            base.clone()
        } else {
            format!("{}/{rel}", base.trim_end_matches('/'))
        };
        println!(
            "{:>12} {:>12} {:>12} {:>9}  {shown}",
            human(e.logical_bytes),
            human(e.stored_bytes),
            human(e.disk_bytes),
            e.files
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn keygen(out: &Path) -> Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    let (secret, public) = kcache_store::generate_key()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    writeln!(f, "{secret}")?;
    std::fs::write(out.with_extension("pub"), format!("{public}\n"))
        .with_context(|| format!("writing {}", out.with_extension("pub").display()))?;
    println!("{public}");
    eprintln!(
        "secret key in {} (keep it private); public key above and in {}",
        out.display(),
        out.with_extension("pub").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A key given on the command line: the hex itself, or a file holding it.
fn read_key(k: &str) -> Result<String> {
    let p = Path::new(k);
    if p.exists() {
        return Ok(std::fs::read_to_string(p)
            .with_context(|| format!("reading key {}", p.display()))?
            .trim()
            .to_owned());
    }
    Ok(k.trim().to_owned())
}

pub fn push(
    store: Option<PathBuf>,
    volume: String,
    tag: Option<String>,
    sign: Option<PathBuf>,
    replace: bool,
    upstream: String,
) -> Result<ExitCode> {
    let store = store.unwrap_or_else(default_store);
    let tag = tag.unwrap_or_else(|| volume.clone());
    let sign = match sign {
        Some(p) => {
            let k = read_key(&p.display().to_string())?;
            kcache_store::public_key_of(&k)
                .with_context(|| format!("signing key {}", p.display()))?;
            Some(crate::control::Secret(k))
        }
        None => None,
    };
    // The bar counts the bytes to upload, once the upstream's listing says which.
    let mut bar: Option<indicatif::ProgressBar> = None;
    let v = request_with_progress(
        &store,
        Some(&volume),
        Request::Push {
            volume: volume.clone(),
            upstream: upstream.clone(),
            tag: tag.clone(),
            sign,
            env: crate::control::command_settings(),
            replace,
        },
        &mut |p| {
            let b = bar.get_or_insert_with(|| crate::import::progress_bar(p.bytes_total));
            b.set_position(p.bytes_done);
            b.set_message(format!("{}/{} blobs", p.blobs_done, p.blobs_total));
        },
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let v = expect!(v?, Reply::Pushed(v) => v);
    println!(
        "pushed volume {volume} to {upstream} as {tag}: {} blobs uploaded ({}), {} already there; manifest {}",
        v.blobs_uploaded,
        human(v.bytes_uploaded),
        v.blobs_present,
        v.manifest
    );
    match &v.merged_with {
        Some(m) => {
            println!("  merged with what the tag named before ({m}): names only it had stay")
        }
        None if replace => println!("  replaced what the tag named"),
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(
    store: Option<PathBuf>,
    volume: String,
    trusted_keys: Vec<String>,
    source: String,
    mode: kcache_store::PullMode,
) -> Result<ExitCode> {
    let trusted_keys = trusted_keys
        .iter()
        .map(|k| read_key(k))
        .collect::<Result<Vec<_>>>()?;
    let store = store.unwrap_or_else(default_store);
    let (upstream, tag) = crate::cli::split_source(&source);
    let tag = tag.unwrap_or_else(|| volume.clone());
    if !store.join("kcache.db").exists() {
        // A fresh machine: create the store, with the volume's first use.
        Store::open(&store).with_context(|| format!("creating store {}", store.display()))?;
    }
    let v = request(
        &store,
        None,
        Request::Pull {
            volume: volume.clone(),
            upstream: upstream.clone(),
            tag: tag.clone(),
            trusted_keys,
            env: crate::control::command_settings(),
            mode,
        },
    )?;
    let v = expect!(v, Reply::Pulled(v) => v);
    if v.mode == "replace" {
        println!(
            "pulled {upstream}:{tag} into volume {volume} (replaced {} files): {} names, {} files, {} blobs ({} to fetch on first open); manifest {}",
            v.removed, v.added, v.files, v.blobs, v.blobs_remote, v.manifest
        );
    } else {
        println!(
            "merged {upstream}:{tag} into volume {volume}: {} added, {} updated, {} unchanged, {} kept, {} conflicts skipped, {} only local; {} files, {} blobs ({} to fetch on first open); manifest {}",
            v.added,
            v.updated,
            v.unchanged,
            v.kept,
            v.skipped,
            v.local_only,
            v.files,
            v.blobs,
            v.blobs_remote,
            v.manifest
        );
    }
    if !v.conflicts.is_empty() {
        let more = (v.kept + v.skipped).saturating_sub(v.conflicts.len() as u64);
        let what = if v.skipped > 0 && v.kept == 0 {
            "skipped (a directory against a non-directory)"
        } else {
            "kept as the volume had them"
        };
        println!(
            "conflicts {what}: {}{}",
            v.conflicts.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
