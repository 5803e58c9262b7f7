//! The control protocol's messages, one set of types for both ends: the requests, the reply
//! to each, and the lines on the wire. The daemon builds a reply and the command reads the
//! same type back, so a field cannot be given by one side and missed by the other.
//!
//! On the wire a connection carries one request line (`Request`, JSON) and, back, any number
//! of progress lines (`{"progress": ...}`) and then one answer line (`Answer`).

use std::path::PathBuf;

use kcache_store::{
    DuEntry, GcReport, Limits, MinFree, PullMode, PullReport, PushProgress, PushReport, Stats,
    VolumeSummary,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The store's limits on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitsMsg {
    pub quota: Option<u64>,
    pub low_watermark_pct: u8,
    /// "10%" or a byte count.
    pub min_free: String,
}

impl From<Limits> for LimitsMsg {
    fn from(l: Limits) -> LimitsMsg {
        LimitsMsg {
            quota: l.quota,
            low_watermark_pct: l.low_watermark_pct,
            min_free: l.min_free.to_string(),
        }
    }
}

impl TryFrom<LimitsMsg> for Limits {
    type Error = String;
    fn try_from(m: LimitsMsg) -> Result<Limits, String> {
        if !(1..=100).contains(&m.low_watermark_pct) {
            return Err(format!(
                "invalid low watermark {}% (1-100)",
                m.low_watermark_pct
            ));
        }
        Ok(Limits {
            quota: m.quota.filter(|q| *q > 0),
            low_watermark_pct: m.low_watermark_pct,
            min_free: m.min_free.parse::<MinFree>()?,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Stats,
    /// Show the limits, or replace them.
    Limits {
        set: Option<LimitsMsg>,
    },
    Evict {
        to: Option<u64>,
        older_than_secs: Option<u64>,
    },
    Gc,
    /// `volume`: None means the mounted one.
    Clear {
        volume: Option<String>,
        path: String,
    },
    Pin {
        volume: Option<String>,
        paths: Vec<String>,
    },
    Unpin {
        volume: Option<String>,
        paths: Vec<String>,
    },
    Pins {
        volume: Option<String>,
    },
    Du {
        volume: Option<String>,
        path: String,
        depth: u32,
    },
    VolumeCreate {
        name: String,
    },
    VolumeList,
    VolumeRm {
        name: String,
    },
    VolumeClone {
        src: String,
        dst: String,
    },
    Push {
        volume: String,
        upstream: String,
        tag: String,
        /// Secret signing key, hex (the socket is the daemon user's only).
        sign: Option<Secret>,
        /// The command's object store settings (AWS_*, GOOGLE_*, STORAGE_EMULATOR_HOST,
        /// AZURE_*, HOME), for an s3://, gs:// or az:// upstream.
        #[serde(default)]
        env: Vec<(String, Secret)>,
        /// Publish exactly this volume instead of adding it to what the tag names.
        #[serde(default)]
        replace: bool,
    },
    Pull {
        volume: String,
        upstream: String,
        tag: String,
        trusted_keys: Vec<String>,
        #[serde(default)]
        env: Vec<(String, Secret)>,
        /// Merge (the default) or replace.
        #[serde(default)]
        mode: PullMode,
    },
    /// Mount one more volume (daemon only).
    Mount {
        volume: String,
        mountpoint: PathBuf,
        options: Vec<String>,
    },
    /// The daemon's mounts.
    Mounts,
}

impl Request {
    /// The request's name on the wire (its `cmd`), for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Stats => "stats",
            Request::Limits { .. } => "limits",
            Request::Evict { .. } => "evict",
            Request::Gc => "gc",
            Request::Clear { .. } => "clear",
            Request::Pin { .. } => "pin",
            Request::Unpin { .. } => "unpin",
            Request::Pins { .. } => "pins",
            Request::Du { .. } => "du",
            Request::VolumeCreate { .. } => "volume_create",
            Request::VolumeList => "volume_list",
            Request::VolumeRm { .. } => "volume_rm",
            Request::VolumeClone { .. } => "volume_clone",
            Request::Push { .. } => "push",
            Request::Pull { .. } => "pull",
            Request::Mount { .. } => "mount",
            Request::Mounts => "mounts",
        }
    }
}

/// A mount as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub volume: String,
    pub dev: u64,
}

/// What the daemon says about the store (`kcache stats`): the store's own statistics and
/// what only a filesystem over it knows. An unmounted store gives the same fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    #[serde(flatten)]
    pub store: Stats,
    /// Free space on the store's disk that an unprivileged writer can use.
    pub disk_available_bytes: u64,
    /// The free space the limits keep, in bytes (`min_free` resolved against the disk).
    pub min_free_bytes: u64,
    /// The volume the answer is about: the daemon's first mount, or an unmounted store's
    /// first volume.
    pub volume: String,
    /// The FUSE transport serving that volume: "io_uring", "classic", or "none" when
    /// it is not mounted.
    #[serde(default = "no_transport")]
    pub transport: String,
    /// Background pushes and follows (mount options `push=`, `follow=`): what each last did,
    /// and each push's upload queue.
    #[serde(default)]
    pub sync: Vec<kcache_store::SyncStatus>,
    /// Why the daemon's store stopped taking changes, if it did (its database rolled back a
    /// group of acknowledged changes; a remount recovers): `kcache stats` says so first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
}

fn no_transport() -> String {
    "none".into()
}

/// What `kcache evict` freed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvictReply {
    pub blobs: u64,
    pub bytes: u64,
    /// Names that went with the evicted blobs (names of files an upstream holds stay).
    pub names: u64,
    pub usage_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PinsReply {
    pub pins: Vec<String>,
    pub pinned_bytes: u64,
}

/// The result of each request, one variant per request. On the wire it is the variant's
/// content alone (the request says which variant it is: `Reply::decode`), the JSON shape the
/// commands print with `--json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Stats(StatsReply),
    Limits(LimitsMsg),
    Evicted(EvictReply),
    Gc(GcReport),
    Cleared {
        removed: u64,
    },
    Pinned {
        pinned_bytes: u64,
    },
    Unpinned {
        unpinned: u64,
    },
    Pins(PinsReply),
    Du(Vec<DuEntry>),
    VolumeCreated {
        created: String,
    },
    Volumes(Vec<VolumeSummary>),
    VolumeRemoved {
        removed: String,
        files: u64,
    },
    VolumeCloned {
        cloned: String,
        to: String,
        seconds: f64,
    },
    Pushed(PushReport),
    Pulled(PullReport),
    Mounted {
        mounted: PathBuf,
        volume: String,
    },
    Mounts(Vec<MountInfo>),
}

impl Reply {
    /// Reads the result of `req` as its reply type.
    pub fn decode(req: &Request, v: Value) -> Result<Reply, serde_json::Error> {
        use serde_json::from_value as of;
        #[derive(Deserialize)]
        struct Cleared {
            removed: u64,
        }
        #[derive(Deserialize)]
        struct Pinned {
            pinned_bytes: u64,
        }
        #[derive(Deserialize)]
        struct Unpinned {
            unpinned: u64,
        }
        #[derive(Deserialize)]
        struct Created {
            created: String,
        }
        #[derive(Deserialize)]
        struct Removed {
            removed: String,
            files: u64,
        }
        #[derive(Deserialize)]
        struct Cloned {
            cloned: String,
            to: String,
            seconds: f64,
        }
        #[derive(Deserialize)]
        struct Mounted {
            mounted: PathBuf,
            volume: String,
        }
        Ok(match req {
            Request::Stats => Reply::Stats(of(v)?),
            Request::Limits { .. } => Reply::Limits(of(v)?),
            Request::Evict { .. } => Reply::Evicted(of(v)?),
            Request::Gc => Reply::Gc(of(v)?),
            Request::Clear { .. } => Reply::Cleared {
                removed: of::<Cleared>(v)?.removed,
            },
            Request::Pin { .. } => Reply::Pinned {
                pinned_bytes: of::<Pinned>(v)?.pinned_bytes,
            },
            Request::Unpin { .. } => Reply::Unpinned {
                unpinned: of::<Unpinned>(v)?.unpinned,
            },
            Request::Pins { .. } => Reply::Pins(of(v)?),
            Request::Du { .. } => Reply::Du(of(v)?),
            Request::VolumeCreate { .. } => Reply::VolumeCreated {
                created: of::<Created>(v)?.created,
            },
            Request::VolumeList => Reply::Volumes(of(v)?),
            Request::VolumeRm { .. } => {
                let r: Removed = of(v)?;
                Reply::VolumeRemoved {
                    removed: r.removed,
                    files: r.files,
                }
            }
            Request::VolumeClone { .. } => {
                let r: Cloned = of(v)?;
                Reply::VolumeCloned {
                    cloned: r.cloned,
                    to: r.to,
                    seconds: r.seconds,
                }
            }
            Request::Push { .. } => Reply::Pushed(of(v)?),
            Request::Pull { .. } => Reply::Pulled(of(v)?),
            Request::Mount { .. } => {
                let r: Mounted = of(v)?;
                Reply::Mounted {
                    mounted: r.mounted,
                    volume: r.volume,
                }
            }
            Request::Mounts => Reply::Mounts(of(v)?),
        })
    }

    /// The variant's name, for a message about an answer that does not fit its request.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Stats(_) => "stats",
            Reply::Limits(_) => "limits",
            Reply::Evicted(_) => "evicted",
            Reply::Gc(_) => "gc",
            Reply::Cleared { .. } => "cleared",
            Reply::Pinned { .. } => "pinned",
            Reply::Unpinned { .. } => "unpinned",
            Reply::Pins(_) => "pins",
            Reply::Du(_) => "du",
            Reply::VolumeCreated { .. } => "volume created",
            Reply::Volumes(_) => "volumes",
            Reply::VolumeRemoved { .. } => "volume removed",
            Reply::VolumeCloned { .. } => "volume cloned",
            Reply::Pushed(_) => "pushed",
            Reply::Pulled(_) => "pulled",
            Reply::Mounted { .. } => "mounted",
            Reply::Mounts(_) => "mounts",
        }
    }
}

/// A progress line of a long request (only `push` reports progress).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgressLine {
    pub progress: PushProgress,
}

/// The answer line. `ok` with `result`; or not `ok`, with `error`, and `leaving` when the
/// daemon is shutting down and did nothing with the request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

impl Answer {
    pub fn ok(r: &Reply) -> Answer {
        Answer {
            ok: true,
            // A reply is plain data: numbers, strings, lists, maps.
            result: Some(serde_json::to_value(r).unwrap_or(Value::Null)),
            error: None,
            leaving: false,
        }
    }

    pub fn failed(e: String) -> Answer {
        Answer {
            ok: false,
            result: None,
            error: Some(e),
            leaving: false,
        }
    }

    pub fn leaving() -> Answer {
        Answer {
            ok: false,
            result: None,
            error: Some("the store's daemon is shutting down".into()),
            leaving: true,
        }
    }

    /// The line that goes on the wire, newline included.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }
}

/// The AWS settings a command sent with its request; a request without any (an older client)
/// is served with the daemon's own environment.
pub fn command_env(env: &[(String, Secret)]) -> Option<Vec<(String, String)>> {
    (!env.is_empty()).then(|| env.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
}

/// A value sent over the socket that must never reach a log line (requests are logged with
/// `Debug`): signing keys, AWS secrets.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The variables of this process that object store settings come from, for the daemon
/// acting for it.
pub fn command_settings() -> Vec<(String, Secret)> {
    kcache_store::objstore::settings_env()
        .into_iter()
        .map(|(k, v)| (k, Secret(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_log_without_their_secrets_and_still_carry_them() {
        let req = Request::Push {
            volume: "v".into(),
            upstream: "s3://b/p".into(),
            tag: "t".into(),
            sign: Some(Secret("signing-key-hex".into())),
            env: vec![("AWS_SECRET_ACCESS_KEY".into(), Secret("hunter2".into()))],
            replace: false,
        };
        let logged = format!("{req:?}");
        assert!(
            !logged.contains("hunter2") && !logged.contains("signing-key-hex"),
            "{logged}"
        );
        assert!(logged.contains("AWS_SECRET_ACCESS_KEY"), "{logged}");
        let wire = serde_json::to_string(&req).unwrap();
        let Request::Push { sign, env, .. } = serde_json::from_str(&wire).unwrap() else {
            panic!("not a push: {wire}");
        };
        assert_eq!(sign.unwrap().0, "signing-key-hex");
        assert_eq!(
            command_env(&env).unwrap(),
            vec![("AWS_SECRET_ACCESS_KEY".to_string(), "hunter2".to_string())]
        );
        assert!(command_env(&[]).is_none());
    }
}
