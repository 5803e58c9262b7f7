//! `kcache import`: copies an existing cache directory into a volume through the mount, so
//! the filesystem deduplicates it like any other write. Modes, times, owners (as root),
//! symlinks and hard links are kept; a file already there with the same size and mtime is
//! skipped, so importing the same tree again stores nothing new.

use std::collections::HashMap;
use std::fs::{self, File, FileTimes};
use std::io::IsTerminal;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::admin::human;
use crate::cli::VolumeAt;
use crate::mountinfo;

#[derive(Default, Debug)]
struct Tally {
    files_copied: u64,
    bytes_copied: u64,
    files_unchanged: u64,
    dirs: u64,
    symlinks: u64,
    hard_links: u64,
    skipped_special: u64,
}

pub fn import(vol: &VolumeAt, src: &Path, dest: &Path) -> Result<ExitCode> {
    let meta = fs::symlink_metadata(src).with_context(|| format!("{}", src.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", src.display());
    }
    if dest
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("{}: '..' is not allowed in the destination", dest.display());
    }
    let Some(store) = &vol.store else {
        return import_into(src, &in_mount(dest)?);
    };
    // --store: the destination is a path inside the volume. Use a mount of that volume if
    // the daemon has one, else mount it privately for the import (a running daemon adds the
    // mount; otherwise one starts for it).
    let canon = store
        .canonicalize()
        .with_context(|| format!("{}", store.display()))?;
    let rel = dest.strip_prefix("/").unwrap_or(dest);
    // A daemon that is starting or leaving is waited for first, so that its answer counts.
    let deadline = std::time::Instant::now() + crate::holder::settle_bound();
    let served = crate::holder::settle(&canon, deadline)? == crate::holder::Holder::Daemon;
    let mounted = served
        .then(|| crate::control::call(&canon, &crate::control::Request::Mounts).ok())
        .flatten()
        .and_then(|r| match r {
            crate::control::Reply::Mounts(list) => Some(list),
            _ => None,
        })
        .and_then(|list| list.into_iter().find(|m| m.volume == vol.volume));
    if let Some(m) = mounted {
        return import_into(src, &m.mountpoint.join(rel));
    }
    let tmp = std::env::temp_dir().join(format!("kcache-import-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let exe = std::env::current_exe().context("finding the kcache binary")?;
    let st = Command::new(&exe)
        .arg("mount")
        .arg("--store")
        .arg(&canon)
        .arg("--volume")
        .arg(&vol.volume)
        .arg(&tmp)
        .status()
        .context("mounting the store for the import")?;
    if !st.success() {
        let _ = fs::remove_dir(&tmp);
        bail!("could not mount {} for the import", canon.display());
    }
    let res = import_into(src, &tmp.join(rel));
    let st = Command::new(&exe).arg("umount").arg(&tmp).status();
    let _ = fs::remove_dir(&tmp);
    match st {
        Ok(s) if s.success() => {}
        _ => eprintln!("kcache: warning: could not unmount {}", tmp.display()),
    }
    res
}

/// Checks that `dest` (existing or to be created) lies inside a kcache mount.
fn in_mount(dest: &Path) -> Result<PathBuf> {
    let mut existing = dest.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    let base = if existing.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        existing.clone()
    };
    let canon = base
        .canonicalize()
        .with_context(|| format!("{}", base.display()))?;
    if mountinfo::kcache_mount_of(&canon).is_none() {
        bail!(
            "{} is not inside a kcache mount (give --store to import into an unmounted store)",
            dest.display()
        );
    }
    Ok(canon.join(dest.strip_prefix(&existing).unwrap_or(Path::new(""))))
}

/// A byte progress bar on a terminal; hidden otherwise.
/// A byte-counting progress bar on a terminal's stderr (hidden otherwise), with a message
/// slot for counts.
pub(crate) fn progress_bar(total: u64) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn import_into(src: &Path, dest: &Path) -> Result<ExitCode> {
    let total = scan_bytes(src)?;
    let bar = progress_bar(total);
    let mut t = Tally::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    copy_dir(src, dest, &mut t, &mut links, &bar)?;
    bar.finish_and_clear();
    println!(
        "imported {} files ({}), {} unchanged, {} directories, {} symlinks, {} hard links",
        t.files_copied,
        human(t.bytes_copied),
        t.files_unchanged,
        t.dirs,
        t.symlinks,
        t.hard_links
    );
    if t.skipped_special > 0 {
        println!("skipped {} sockets, fifos or devices", t.skipped_special);
    }
    Ok(ExitCode::SUCCESS)
}

fn scan_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let m = e.metadata()?;
        if m.is_dir() {
            total += scan_bytes(&e.path())?;
        } else if m.is_file() {
            total += m.len();
        }
    }
    Ok(total)
}

fn times_of(m: &fs::Metadata) -> (SystemTime, SystemTime) {
    let t = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
        }
    };
    (t(m.atime(), m.atime_nsec()), t(m.mtime(), m.mtime_nsec()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chown(path: &Path, m: &fs::Metadata) -> Result<()> {
    if is_root() {
        std::os::unix::fs::lchown(path, Some(m.uid()), Some(m.gid()))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

fn copy_dir(
    src: &Path,
    dest: &Path,
    t: &mut Tally,
    links: &mut HashMap<(u64, u64), PathBuf>,
    bar: &ProgressBar,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", src.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let s = e.path();
        let d = dest.join(e.file_name());
        let m = fs::symlink_metadata(&s).with_context(|| format!("{}", s.display()))?;
        let ft = m.file_type();
        let existing = fs::symlink_metadata(&d).ok();
        if ft.is_dir() {
            if existing.as_ref().is_some_and(|x| !x.is_dir()) {
                fs::remove_file(&d).with_context(|| format!("replacing {}", d.display()))?;
            }
            if !existing.as_ref().is_some_and(|x| x.is_dir()) {
                fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            }
            copy_dir(&s, &d, t, links, bar)?;
            t.dirs += 1;
        } else if ft.is_symlink() {
            let target = fs::read_link(&s).with_context(|| format!("{}", s.display()))?;
            let same = existing
                .as_ref()
                .is_some_and(|x| x.file_type().is_symlink())
                && fs::read_link(&d).ok().as_deref() == Some(target.as_path());
            if !same {
                remove_any(&d, existing.as_ref())?;
                std::os::unix::fs::symlink(&target, &d)
                    .with_context(|| format!("creating symlink {}", d.display()))?;
                chown(&d, &m)?;
                set_symlink_times(&d, &m)?;
            }
            t.symlinks += 1;
        } else if ft.is_file() {
            copy_file(&s, &d, &m, existing.as_ref(), t, links, bar)?;
        } else {
            t.skipped_special += 1;
        }
    }
    // Directory attributes last: adding entries changes its mtime.
    let m = fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    chown(dest, &m)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(m.mode() & 0o7777))
        .with_context(|| format!("chmod {}", dest.display()))?;
    let (atime, mtime) = times_of(&m);
    File::open(dest)
        .and_then(|f| f.set_times(FileTimes::new().set_accessed(atime).set_modified(mtime)))
        .with_context(|| format!("setting times of {}", dest.display()))?;
    Ok(())
}

/// Times of a symlink itself (std has no lutimes).
fn set_symlink_times(path: &Path, m: &fs::Metadata) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let ts = [
        libc::timespec {
            tv_sec: m.atime(),
            tv_nsec: m.atime_nsec(),
        },
        libc::timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting times of {}", path.display()));
    }
    Ok(())
}

fn remove_any(path: &Path, existing: Option<&fs::Metadata>) -> Result<()> {
    match existing {
        Some(m) if m.is_dir() => fs::remove_dir_all(path),
        Some(_) => fs::remove_file(path),
        None => Ok(()),
    }
    .with_context(|| format!("replacing {}", path.display()))
}

fn copy_file(
    s: &Path,
    d: &Path,
    m: &fs::Metadata,
    existing: Option<&fs::Metadata>,
    t: &mut Tally,
    links: &mut HashMap<(u64, u64), PathBuf>,
    bar: &ProgressBar,
) -> Result<()> {
    let key = (m.dev(), m.ino());
    if m.nlink() > 1 {
        if let Some(first) = links.get(&key) {
            let first_ino = fs::metadata(first).map(|f| f.ino()).ok();
            if existing.is_some_and(|x| Some(x.ino()) == first_ino) {
                t.hard_links += 1;
                return Ok(());
            }
            remove_any(d, existing)?;
            fs::hard_link(first, d).with_context(|| format!("linking {}", d.display()))?;
            t.hard_links += 1;
            return Ok(());
        }
        links.insert(key, d.to_path_buf());
    }
    let unchanged = existing.is_some_and(|x| {
        x.is_file()
            && x.len() == m.len()
            && x.mtime() == m.mtime()
            && x.mtime_nsec() == m.mtime_nsec()
    });
    if unchanged {
        t.files_unchanged += 1;
        bar.inc(m.len());
        return Ok(());
    }
    // Copy to a temporary name and rename into place: a file visible under its name is
    // always complete, even if the import is interrupted.
    let name = d
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = d.with_file_name(format!(".{name}.kcache-import"));
    let mut from = File::open(s).with_context(|| format!("opening {}", s.display()))?;
    let mut to = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let n = std::io::copy(&mut from, &mut bar.wrap_write(&mut to))
        .with_context(|| format!("copying {} to {}", s.display(), tmp.display()))?;
    // Owner before mode: chown clears setuid/setgid bits.
    chown(&tmp, m)?;
    to.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    let (atime, mtime) = times_of(m);
    to.set_times(FileTimes::new().set_accessed(atime).set_modified(mtime))
        .with_context(|| format!("setting times of {}", tmp.display()))?;
    drop(to);
    if existing.is_some_and(|x| x.is_dir()) {
        fs::remove_dir_all(d).with_context(|| format!("replacing {}", d.display()))?;
    }
    fs::rename(&tmp, d)
        .with_context(|| format!("renaming {} to {}", tmp.display(), d.display()))?;
    t.files_copied += 1;
    t.bytes_copied += n;
    Ok(())
}

/// `kcache prefetch`: opens every file under `paths` in a mount, which fetches content that
/// only an upstream has (the first open downloads and verifies the whole file).
pub fn prefetch(paths: &[PathBuf]) -> Result<ExitCode> {
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).with_context(|| format!("{}", p.display()))?;
        if m.is_dir() {
            for e in fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                stack.push(
                    e.with_context(|| format!("reading {}", p.display()))?
                        .path(),
                );
            }
        } else if m.is_file() {
            files.push((p, m.len()));
        }
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    let bar = progress_bar(total);
    let mut failed = 0;
    for (p, len) in &files {
        let res = File::open(p).and_then(|f| {
            let mut b = [0u8; 1];
            std::io::Read::read(&mut &f, &mut b).map(|_| ())
        });
        if let Err(e) = res {
            bar.suspend(|| eprintln!("kcache: {}: {e}", p.display()));
            failed += 1;
        }
        bar.inc(*len);
    }
    bar.finish_and_clear();
    println!(
        "prefetched {} files ({}){}",
        files.len() - failed,
        human(total),
        if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        }
    );
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
