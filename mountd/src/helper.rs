//! `mount.kcache`: the mount(8) helper. mount(8) runs `/sbin/mount.kcache SOURCE DIR
//! [-sfnv] [-o OPTIONS]` for `mount -t kcache` and fstab entries of type kcache; SOURCE is
//! the store directory. Exit codes follow mount(8): 0 mounted, 1 usage, 32 mount failure.

use std::ffi::OsString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::{MountArgs, MountOpts};

/// mount(8)'s "mount failure" status.
const MOUNT_FAILURE: u8 = 32;
const USAGE: u8 = 1;

/// True when the binary was started under the helper's name.
pub fn invoked_as_helper() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().starts_with("mount.kcache"))
        })
        .unwrap_or(false)
}

struct HelperArgs {
    source: PathBuf,
    dir: PathBuf,
    options: Vec<String>,
    sloppy: bool,
    fake: bool,
    verbose: bool,
}

fn parse(args: &[OsString]) -> Result<HelperArgs, String> {
    let mut pos: Vec<PathBuf> = Vec::new();
    let mut h = HelperArgs {
        source: PathBuf::new(),
        dir: PathBuf::new(),
        options: Vec::new(),
        sloppy: false,
        fake: false,
        verbose: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if let Some(flags) = s.strip_prefix('-').filter(|f| !f.is_empty()) {
            let mut chars = flags.chars();
            while let Some(c) = chars.next() {
                match c {
                    's' => h.sloppy = true,
                    'f' => h.fake = true,
                    // There is no mtab to skip writing to any more.
                    'n' => {}
                    'v' => h.verbose = true,
                    'o' | 't' | 'N' => {
                        let rest: String = chars.by_ref().collect();
                        let val = if rest.is_empty() {
                            it.next()
                                .map(|v| v.to_string_lossy().into_owned())
                                .ok_or(format!("option -{c} needs a value"))?
                        } else {
                            rest
                        };
                        match c {
                            'o' => h.options.push(val),
                            'N' => return Err("mount namespaces (-N) are not supported".into()),
                            // -t kcache[.subtype]: we are the helper for exactly that type.
                            _ => {}
                        }
                    }
                    other => return Err(format!("unknown flag -{other}")),
                }
            }
        } else {
            pos.push(PathBuf::from(a));
        }
    }
    match <[PathBuf; 2]>::try_from(pos) {
        Ok([source, dir]) => {
            h.source = source;
            h.dir = dir;
            Ok(h)
        }
        Err(_) => Err("usage: mount.kcache STORE_DIR MOUNTPOINT [-sfnv] [-o OPTIONS]".into()),
    }
}

/// Runs as mount.kcache; never returns an error, only an exit code with a message.
pub fn run() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let h = match parse(&args) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mount.kcache: {e}");
            return ExitCode::from(USAGE);
        }
    };
    match mount(&h) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "mount.kcache: {} on {}: {e:#}",
                h.source.display(),
                h.dir.display()
            );
            ExitCode::from(MOUNT_FAILURE)
        }
    }
}

fn mount(h: &HelperArgs) -> Result<()> {
    // Check every option before anything happens; with -s unknown ones are dropped here.
    let opts = MountOpts::parse_with(&h.options, h.sloppy).map_err(|e| anyhow::anyhow!(e))?;
    let known: Vec<String> = if h.sloppy {
        h.options
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|o| MountOpts::parse(&[o.to_string()]).is_ok())
            .map(str::to_owned)
            .collect()
    } else {
        h.options.clone()
    };
    if h.verbose {
        eprintln!(
            "mount.kcache: mounting store {} (volume {}) on {} with options {:?}",
            h.source.display(),
            opts.volume.as_deref().unwrap_or("default"),
            h.dir.display(),
            known.join(",")
        );
    }
    if h.fake {
        return Ok(());
    }
    if !h.source.join("kcache.db").exists() && h.source.exists() {
        let empty = std::fs::read_dir(&h.source)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!(
                "{} is neither a kcache store nor an empty directory",
                h.source.display()
            );
        }
    }
    let args = MountArgs {
        store: Some(h.source.clone()),
        volume: "default".into(),
        foreground: false,
        quota: None,
        min_free: None,
        low_watermark: None,
        metrics: None,
        options: known,
        ready_fd: None,
        mountpoint: h.dir.clone(),
    };
    crate::daemon::mount(args).map(|_| ())
}

/// `kcache install`: puts `mount.kcache` (a symlink to this binary) where mount(8) looks.
pub fn install(dir: &Path, force: bool) -> Result<ExitCode> {
    let exe = std::env::current_exe()
        .and_then(|e| e.canonicalize())
        .context("locating the kcache binary")?;
    let link = dir.join("mount.kcache");
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() || force => {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?
        }
        Ok(_) => bail!(
            "{} exists and is not a symlink; remove it or use --force",
            link.display()
        ),
        Err(_) => {}
    }
    symlink(&exe, &link)
        .with_context(|| format!("creating {} -> {}", link.display(), exe.display()))?;
    println!("installed {} -> {}", link.display(), exe.display());
    Ok(ExitCode::SUCCESS)
}
