//! Command-line syntax. Raw flags are validated into typed options here, so the rest of the
//! program never sees unvalidated input.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kcache_store::MinFree;

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
    /// Show what the store holds, its limits, and its counters
    Stats {
        #[command(flatten)]
        at: StoreAt,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Show or change the quota and watermarks (applies at once on a mounted store)
    Quota {
        #[arg(long)]
        store: Option<PathBuf>,
        /// Eviction brings usage down to this percentage of the quota
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
        low_watermark: Option<u8>,
        /// Free space to keep on the store's disk: SIZE (K/M/G/T) or PERCENT% of the disk
        #[arg(long, value_name = "SIZE|PERCENT", value_parser = parse_min_free)]
        min_free: Option<MinFree>,
        #[arg(long)]
        json: bool,
        /// [MOUNTPOINT] [SIZE|none]: the mountpoint is left out when --store is given
        #[arg(value_name = "MOUNTPOINT SIZE")]
        args: Vec<String>,
    },
    /// Evict least-recently-used files until the store holds at most SIZE
    Evict {
        #[command(flatten)]
        at: StoreAt,
        /// Target size: bytes, or with a K, M, G or T suffix (powers of 1024)
        #[arg(long = "to", value_name = "SIZE", value_parser = parse_size)]
        to: u64,
    },
    /// Evict files not used for a while (by last access)
    Clean {
        #[command(flatten)]
        at: StoreAt,
        /// Age: a number with s, m, h, d or w (for example 30d)
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: u64,
    },
    /// Remove what nothing refers to any more and compact the database log
    Gc {
        #[command(flatten)]
        at: StoreAt,
        #[arg(long)]
        json: bool,
    },
    /// Remove a file, or everything inside a directory (whole volume without PATH)
    Clear {
        #[command(flatten)]
        vol: VolumeAt,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
        path: Option<PathBuf>,
    },
    /// Keep files or whole trees from ever being evicted (at most half the quota)
    Pin {
        #[command(flatten)]
        vol: VolumeAt,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Undo `kcache pin`
    Unpin {
        #[command(flatten)]
        vol: VolumeAt,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List pinned paths
    Pins {
        #[command(flatten)]
        vol: VolumeAt,
        #[arg(long)]
        json: bool,
        /// A path in the mount (default: the volume given with --store/--volume)
        path: Option<PathBuf>,
    },
    /// Logical and stored bytes per directory: who fills the cache
    Du {
        #[command(flatten)]
        vol: VolumeAt,
        /// Show directories down to this many levels below PATH
        #[arg(long, short = 'd', default_value_t = 1)]
        depth: u32,
        #[arg(long)]
        json: bool,
        path: Option<PathBuf>,
    },
    /// Copy an existing cache directory into a volume, deduplicated, keeping modes, times,
    /// symlinks and hard links; files already there (same size and time) are skipped
    Import {
        #[command(flatten)]
        vol: VolumeAt,
        src: PathBuf,
        /// A directory in a mount (or, with --store, a path inside the volume)
        dest: PathBuf,
    },
    /// Upload a volume to an upstream: the blobs it lacks, a snapshot manifest, then a tag
    Push {
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        volume: String,
        /// Tag to publish under [default: the volume's name]
        #[arg(long)]
        tag: Option<String>,
        /// Sign the snapshot with this secret key file (from `kcache keygen`)
        #[arg(long, value_name = "KEYFILE")]
        sign: Option<PathBuf>,
        /// Publish exactly this volume under the tag, dropping what other pushes added to it
        /// (by default a push adds to the tag: names only the tag had stay)
        #[arg(long)]
        replace: bool,
        /// s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///path (http
        /// upstreams are read-only)
        upstream: String,
    },
    /// Fetch the content of files (or whole trees) in a mount now, instead of on first open
    Prefetch {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Make an ed25519 key pair for signing snapshots
    Keygen {
        /// Where to write the secret key (mode 0600); the public key is printed
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Merge the snapshot an upstream tag names into a volume, mounted or not (content is
    /// fetched on first open)
    ///
    /// Names only the volume has stay, names only the snapshot has are added, a name both
    /// have with different content keeps the volume's file unless --theirs. One transaction:
    /// readers see the old or the new file whole, and open files keep what they opened.
    Pull {
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        volume: String,
        /// Accept only snapshots signed by this public key (hex, or a file holding it);
        /// remembered by the store, so later pulls require a trusted signature too
        #[arg(long = "trusted-key", value_name = "KEY")]
        trusted_keys: Vec<String>,
        /// On a conflict take the snapshot's file (open files keep what they opened); a
        /// directory against a non-directory is still left as the volume has it
        #[arg(long, conflicts_with = "replace")]
        theirs: bool,
        /// Make the volume the snapshot, dropping everything else it holds (refused while
        /// the volume is mounted)
        #[arg(long)]
        replace: bool,
        /// UPSTREAM[:TAG] (the tag defaults to the volume's name)
        source: String,
    },
    /// Serve this store's blobs and volume snapshots over HTTP (read-only), as an upstream
    /// for other machines: they pull http://ADDR:VOLUME
    Serve {
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8370")]
        listen: String,
    },
    /// Install mount.kcache (a symlink to this binary) so `mount -t kcache` and fstab work
    Install {
        /// Where mount(8) looks for helpers
        #[arg(long, default_value = "/sbin")]
        dir: PathBuf,
        /// Replace an existing mount.kcache that is not a symlink
        #[arg(long)]
        force: bool,
    },
    /// Create, list, remove and clone volumes (independent trees sharing the store's blobs)
    Volume {
        #[arg(long, global = true)]
        store: Option<PathBuf>,
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Rehash every blob; quarantine those that do not match; exit 1 if anything is wrong
    Verify {
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum VolumeCmd {
    /// Create an empty volume
    Create { name: String },
    /// List volumes with their file counts and sizes
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume and everything in it (it must not be mounted)
    Rm {
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
        name: String,
    },
    /// Copy a volume: metadata only, no file data is copied; the two are independent after
    Clone { src: String, dst: String },
}

/// Which store a store-wide command acts on: a mountpoint, or --store (default store if
/// neither).
#[derive(clap::Args, Debug, Clone)]
pub struct StoreAt {
    #[arg(long, conflicts_with = "mountpoint")]
    pub store: Option<PathBuf>,
    /// A kcache mountpoint (or any path inside one)
    pub mountpoint: Option<PathBuf>,
}

/// Where paths are: inside a mount (the default), or with --store, inside a volume of that
/// store (paths then start at the volume root).
#[derive(clap::Args, Debug, Clone)]
pub struct VolumeAt {
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Volume, with --store
    #[arg(long, default_value = "default", requires = "store")]
    pub volume: String,
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
    /// Free space to keep on the store's disk: SIZE or PERCENT% [default: 10%]
    #[arg(long, value_name = "SIZE|PERCENT", value_parser = parse_min_free)]
    pub min_free: Option<MinFree>,
    /// Eviction brings usage down to this percentage of the quota [default: 90]
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub low_watermark: Option<u8>,
    /// Serve Prometheus metrics on http://ADDR/metrics (for example 127.0.0.1:9464)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Mount options, comma separated: ro, rw, allow_other, default_permissions, nopassthrough,
    /// io_uring, noio_uring, quota=SIZE, min_free=SIZE|PERCENT, low_watermark=PERCENT, metrics=ADDR, volume=NAME,
    /// uid=N, gid=N, umask=OCTAL (owner and mode of the root), nosuid, nodev, noexec
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
    /// `io_uring` (Some(true)): FUSE over io_uring or fail; `noio_uring` (Some(false)):
    /// /dev/fuse only; neither: io_uring when the kernel allows it.
    pub uring: Option<bool>,
    pub quota: Option<u64>,
    pub min_free: Option<MinFree>,
    pub low_watermark: Option<u8>,
    pub metrics: Option<String>,
    pub volume: Option<String>,
    /// Owner and permissions of the volume's root directory, set at mount.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u32>,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    /// Where blobs only an upstream has are fetched from, in order.
    pub upstreams: Vec<String>,
    /// Seconds an open may wait for a fetch before EIO.
    pub fetch_timeout: Option<u64>,
    /// `push=URL[:TAG]`: upload new content as it is committed and publish the volume's
    /// snapshot (TAG: the volume's name by default).
    pub push: Option<(String, Option<String>)>,
    /// Seconds between snapshot publishes of `push=`.
    pub push_interval: Option<u64>,
    /// `push_sign=KEYFILE`: sign the snapshots `push=` publishes (a key from `kcache keygen`).
    pub push_sign: Option<PathBuf>,
    /// `follow=URL:TAG`: merge that snapshot into the volume periodically.
    pub follow: Option<(String, String)>,
    /// Seconds between merges of `follow=`.
    pub follow_interval: Option<u64>,
}

impl MountOpts {
    pub fn parse(raw: &[String]) -> Result<MountOpts, String> {
        MountOpts::parse_with(raw, false)
    }

    /// Parses comma-separated options. `sloppy` (mount -s) ignores unknown ones instead of
    /// refusing them.
    pub fn parse_with(raw: &[String], sloppy: bool) -> Result<MountOpts, String> {
        let mut o = MountOpts {
            passthrough: true,
            ..MountOpts::default()
        };
        for opt in raw
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
        {
            let (key, val) = match opt.split_once('=') {
                Some((k, v)) => (k.replace('-', "_"), Some(v)),
                None => (opt.replace('-', "_"), None),
            };
            let need = |what: &str| {
                val.filter(|v| !v.is_empty())
                    .ok_or_else(|| format!("mount option '{opt}' needs a value ({what})"))
            };
            match (key.as_str(), val) {
                ("ro", None) => o.read_only = true,
                ("rw", None) => o.read_only = false,
                ("allow_other", None) => o.allow_other = true,
                // Always on: the kernel checks mode bits (see ARCHITECTURE.md).
                ("default_permissions", None) => {}
                ("nopassthrough", None) => o.passthrough = false,
                ("passthrough", None) => o.passthrough = true,
                ("io_uring", None) => o.uring = Some(true),
                ("noio_uring", None) => o.uring = Some(false),
                ("quota", _) => o.quota = Some(parse_size(need("a size")?)?),
                ("min_free", _) => {
                    o.min_free = Some(parse_min_free(need("a size or percentage")?)?)
                }
                ("low_watermark", _) => {
                    o.low_watermark = Some(parse_percent(need("a percentage")?)?)
                }
                ("metrics", _) => o.metrics = Some(need("an address")?.to_owned()),
                ("volume", _) => o.volume = Some(need("a volume name")?.to_owned()),
                ("uid", _) => o.uid = Some(parse_id(opt, need("a user id")?)?),
                ("gid", _) => o.gid = Some(parse_id(opt, need("a group id")?)?),
                ("umask", _) => {
                    o.umask = Some(
                        u32::from_str_radix(need("an octal mask")?, 8)
                            .ok()
                            .filter(|m| *m <= 0o777)
                            .ok_or_else(|| format!("invalid umask in '{opt}' (octal, e.g. 022)"))?,
                    )
                }
                ("upstream", _) => {
                    let u = need("a URL")?;
                    kcache_store::Upstream::parse(u)?;
                    o.upstreams.push(u.to_owned());
                }
                ("push", _) => {
                    let (url, tag) = split_source(need("URL[:TAG]")?);
                    kcache_store::Upstream::parse(&url)?;
                    if url.starts_with("http://") || url.starts_with("https://") {
                        return Err(format!(
                            "'{opt}': http upstreams are read-only; push to file://, s3://"
                        ));
                    }
                    o.push = Some((url, tag));
                }
                ("follow", _) => {
                    let (url, tag) = split_source(need("URL:TAG")?);
                    kcache_store::Upstream::parse(&url)?;
                    let tag = tag.ok_or_else(|| format!("'{opt}' needs a tag: follow=URL:TAG"))?;
                    o.follow = Some((url, tag));
                }
                ("push_sign", _) => {
                    let p = PathBuf::from(need("a key file")?);
                    if !p.is_absolute() {
                        return Err(format!("'{opt}': the key file needs an absolute path"));
                    }
                    o.push_sign = Some(p);
                }
                ("push_interval" | "follow_interval", _) => {
                    let secs = need("seconds")?
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| format!("invalid seconds in '{opt}'"))?;
                    if key == "push_interval" {
                        o.push_interval = Some(secs);
                    } else {
                        o.follow_interval = Some(secs);
                    }
                }
                ("fetch_timeout", _) => {
                    o.fetch_timeout = Some(
                        need("seconds")?
                            .parse()
                            .ok()
                            .filter(|s| *s > 0)
                            .ok_or_else(|| format!("invalid seconds in '{opt}'"))?,
                    )
                }
                ("nosuid", None) => o.nosuid = true,
                ("nodev", None) => o.nodev = true,
                ("noexec", None) => o.noexec = true,
                // Kernel defaults, or atime handling kcache decides itself (always noatime).
                (
                    "suid" | "dev" | "exec" | "atime" | "noatime" | "relatime" | "strictatime"
                    | "nodiratime" | "async",
                    None,
                ) => {}
                // Options for mount(8), fstab and systemd, not for the filesystem.
                (
                    "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "owner"
                    | "group" | "_netdev" | "nofail" | "nosymfollow",
                    None,
                ) => {}
                (k, _) if k.starts_with("x_") || k == "comment" => {}
                _ if sloppy => eprintln!("kcache: ignoring unknown mount option '{opt}'"),
                _ => return Err(format!("unknown mount option '{opt}'")),
            }
        }
        Ok(o)
    }
}

fn parse_id(opt: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("invalid id in '{opt}' (a number)"))
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

/// Parses "10%" or a size.
pub fn parse_min_free(s: &str) -> Result<MinFree, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => Ok(MinFree::Percent(parse_percent(p)?)),
        None => Ok(MinFree::Bytes(parse_size(s)?)),
    }
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("invalid percentage '{s}': expected 1 to 100")),
    }
}

/// Parses "30d", "12h", "90m", "45s", "2w" into seconds.
pub fn parse_age(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("invalid age '{s}': expected a number with s, m, h, d or w (e.g. 30d)");
    let unit = t.chars().last().ok_or_else(bad)?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        'w' => 7 * 86400,
        _ => return Err(bad()),
    };
    let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
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
        assert_eq!(o.uring, None);
        assert_eq!(
            MountOpts::parse(&["io_uring".into()]).unwrap().uring,
            Some(true)
        );
        assert_eq!(
            MountOpts::parse(&["noio_uring".into()]).unwrap().uring,
            Some(false)
        );
        assert_eq!(o.quota, Some(2 << 30));
        let o =
            MountOpts::parse(&["min_free=5%,low_watermark=80,metrics=127.0.0.1:9".into()]).unwrap();
        assert_eq!(o.min_free, Some(MinFree::Percent(5)));
        assert_eq!(o.low_watermark, Some(80));
        assert_eq!(o.metrics.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(parse_min_free("1G").unwrap(), MinFree::Bytes(1 << 30));
        assert!(parse_min_free("101%").is_err());
        assert_eq!(parse_age("30d").unwrap(), 30 * 86400);
        assert!(parse_age("30").unwrap_err().contains("30"));
        // fstab and mount(8) options are accepted; the ones for kcache are applied.
        let o = MountOpts::parse(&[
            "rw,quota=20G,allow_other,_netdev,nofail,x-systemd.automount,defaults".into(),
            "volume=ci,uid=1000,gid=100,umask=027,min-free=5%,nosuid".into(),
        ])
        .unwrap();
        assert_eq!(o.volume.as_deref(), Some("ci"));
        assert_eq!(
            (o.uid, o.gid, o.umask),
            (Some(1000), Some(100), Some(0o027))
        );
        assert_eq!(o.min_free, Some(MinFree::Percent(5)));
        assert!(o.nosuid && o.allow_other);
        assert!(MountOpts::parse(&["umask=999".into()]).is_err());
        assert!(MountOpts::parse(&["quota".into()])
            .unwrap_err()
            .contains("needs a value"));
        assert!(MountOpts::parse_with(&["bogus".into()], true).is_ok());
        let o = MountOpts::parse(&[
            "upstream=http://127.0.0.1:9/c,upstream=file:///srv/c,fetch_timeout=5".into(),
        ])
        .unwrap();
        assert_eq!(o.upstreams.len(), 2);
        assert_eq!(o.fetch_timeout, Some(5));
        let o = MountOpts::parse(&[
            "push=file:///srv/c:fleet,push_interval=5,follow=s3://b/p:main,follow_interval=7"
                .into(),
        ])
        .unwrap();
        assert_eq!(o.push, Some(("file:///srv/c".into(), Some("fleet".into()))));
        assert_eq!(o.follow, Some(("s3://b/p".into(), "main".into())));
        assert_eq!((o.push_interval, o.follow_interval), (Some(5), Some(7)));
        assert_eq!(
            MountOpts::parse(&["push=file:///srv/c".into()])
                .unwrap()
                .push,
            Some(("file:///srv/c".into(), None))
        );
        assert!(MountOpts::parse(&["follow=file:///srv/c".into()])
            .unwrap_err()
            .contains("needs a tag"));
        assert!(MountOpts::parse(&["push=http://h/c:t".into()])
            .unwrap_err()
            .contains("read-only"));
        assert!(MountOpts::parse(&["upstream=ftp://x".into()])
            .unwrap_err()
            .contains("ftp://x"));
        assert!(MountOpts::parse(&["quota=lots".into()])
            .unwrap_err()
            .contains("lots"));
        let e = MountOpts::parse(&["ro,bogus=1".into()]).unwrap_err();
        assert!(e.contains("bogus=1"), "{e}");
    }
}

/// Splits "UPSTREAM[:TAG]": a tag is a ':' suffix after the URL's last '/'.
pub fn split_source(s: &str) -> (String, Option<String>) {
    // Only after the host: "http://host:8080" has a port, not a tag.
    let host_start = s.find("://").map_or(0, |i| i + 3);
    let object_store = ["s3://", "gs://", "az://"].iter().any(|p| s.starts_with(p));
    if object_store && !s[host_start..].contains('/') {
        // A bucket or container has no port: "s3://bucket:tag".
        if let Some(i) = s[host_start..].find(':') {
            let i = host_start + i;
            return (s[..i].to_owned(), Some(s[i + 1..].to_owned()));
        }
    }
    let Some(path_start) = s[host_start..].find('/').map(|i| host_start + i) else {
        // No path: "host:port:tag" (a second colon after the host starts the tag).
        let authority = &s[host_start..];
        let after_brackets = authority.rfind(']').map_or(0, |i| i + 1);
        if authority[after_brackets..].matches(':').count() >= 2 {
            let i =
                host_start + after_brackets + authority[after_brackets..].rfind(':').unwrap_or(0);
            return (s[..i].to_owned(), Some(s[i + 1..].to_owned()));
        }
        return (s.to_owned(), None);
    };
    let slash = s[path_start..]
        .rfind('/')
        .map_or(path_start, |i| path_start + i);
    match s[slash..].rfind(':') {
        Some(i) => (
            s[..slash + i].to_owned(),
            Some(s[slash + i + 1..].to_owned()),
        ),
        None => (s.to_owned(), None),
    }
}

#[cfg(test)]
mod source_tests {
    #[test]
    fn splits_tags_off_urls() {
        use super::split_source;
        assert_eq!(
            split_source("file:///srv/c"),
            ("file:///srv/c".into(), None)
        );
        assert_eq!(
            split_source("http://h:8080/c:ci-main"),
            ("http://h:8080/c".into(), Some("ci-main".into()))
        );
        assert_eq!(
            split_source("http://h:8080"),
            ("http://h:8080".into(), None)
        );
        assert_eq!(
            split_source("s3://bucket:main"),
            ("s3://bucket".into(), Some("main".into()))
        );
        assert_eq!(
            split_source("s3://bucket/team/pip:main"),
            ("s3://bucket/team/pip".into(), Some("main".into()))
        );
        assert_eq!(split_source("s3://bucket"), ("s3://bucket".into(), None));
        assert_eq!(
            split_source("gs://bucket:main"),
            ("gs://bucket".into(), Some("main".into()))
        );
        assert_eq!(
            split_source("az://container/p:main"),
            ("az://container/p".into(), Some("main".into()))
        );
    }
}
