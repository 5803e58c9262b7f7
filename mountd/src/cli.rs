//! Command-line syntax. Raw flags are validated into typed options here, so the rest of the
//! program never sees unvalidated input.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "kcache",
    version,
    about = "A deduplicating, content-addressed FUSE cache filesystem"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a volume of a store; returns once the mount answers (unless --foreground)
    Mount(MountArgs),
    /// Unmount a kcache mount and wait for its daemon to finish
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if files are open; the daemon exits when the last one closes
        #[arg(long)]
        lazy: bool,
    },
    /// Show what the store holds and what deduplication saves
    Stats {
        #[arg(long)]
        store: Option<PathBuf>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Evict least-recently-used files until the store holds at most SIZE (unmounted store)
    Evict {
        #[arg(long)]
        store: Option<PathBuf>,
        /// Target size: bytes, or with a K, M, G or T suffix (powers of 1024)
        #[arg(long = "to", value_name = "SIZE", value_parser = parse_size)]
        to: u64,
    },
    /// Rehash every blob; quarantine those that do not match; exit 1 if anything is wrong
    Verify {
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Store directory (default: /var/lib/kcache for root, else $XDG_DATA_HOME/kcache)
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Volume to show at the mountpoint
    #[arg(long, default_value = "default")]
    pub volume: String,
    /// Stay in the foreground and log to stderr
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Keep the store's size at most SIZE by evicting least-recently-used files (K/M/G/T)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub quota: Option<u64>,
    /// Mount options, comma separated: ro, rw, allow_other, default_permissions, nopassthrough,
    /// quota=SIZE
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Internal: file descriptor to report readiness on (set by the daemonizing parent)
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    pub mountpoint: PathBuf,
}

/// Validated mount options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOpts {
    pub read_only: bool,
    pub allow_other: bool,
    pub passthrough: bool,
    pub quota: Option<u64>,
}

impl MountOpts {
    pub fn parse(raw: &[String]) -> Result<MountOpts, String> {
        let mut o = MountOpts {
            passthrough: true,
            ..MountOpts::default()
        };
        for opt in raw
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
        {
            match opt {
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                "allow_other" => o.allow_other = true,
                // Always on: the kernel checks mode bits (see ARCHITECTURE.md).
                "default_permissions" => {}
                "nopassthrough" => o.passthrough = false,
                "passthrough" => o.passthrough = true,
                q if q.starts_with("quota=") => o.quota = Some(parse_size(&q[6..])?),
                other => return Err(format!("unknown mount option '{other}'")),
            }
        }
        Ok(o)
    }
}

/// Parses "512", "64K", "1.5G", "20T" (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        Some('B') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| {
        format!("invalid size '{s}': expected a number with an optional K, M, G or T suffix")
    })?;
    if !v.is_finite() || v < 0.0 || v * mult as f64 > u64::MAX as f64 {
        return Err(format!("invalid size '{s}'"));
    }
    Ok((v * mult as f64) as u64)
}

pub fn parse() -> Cli {
    Cli::parse()
}

/// The store used when none is given.
pub fn default_store() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/kcache");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("kcache");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".local/share/kcache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("20T").unwrap(), 20 << 40);
        assert!(parse_size("12Q").unwrap_err().contains("12Q"));
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn parses_known_options_and_names_unknown_ones() {
        let o =
            MountOpts::parse(&["ro,allow_other".into(), "nopassthrough,quota=2G".into()]).unwrap();
        assert!(o.read_only && o.allow_other && !o.passthrough);
        assert_eq!(o.quota, Some(2 << 30));
        assert!(MountOpts::parse(&["quota=lots".into()])
            .unwrap_err()
            .contains("lots"));
        let e = MountOpts::parse(&["ro,bogus=1".into()]).unwrap_err();
        assert!(e.contains("bogus=1"), "{e}");
    }
}
