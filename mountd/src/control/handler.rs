//! Carries out control requests on a store: the same code for a mounted store (the daemon,
//! for a request that came over its socket) and an unmounted one (the command, in its own
//! process), so both give the same answers.

use kcache_fs::KcacheFs;
use kcache_store::{EvictPolicy, Limits, PullMode, PushProgress, Store};

use super::protocol::{command_env, EvictReply, LimitsMsg, PinsReply, Reply, Request, StatsReply};

/// The volume a request names, if any.
pub fn volume_of(req: &Request) -> Option<&str> {
    match req {
        Request::Clear { volume, .. }
        | Request::Pin { volume, .. }
        | Request::Unpin { volume, .. }
        | Request::Pins { volume }
        | Request::Du { volume, .. } => volume.as_deref(),
        _ => None,
    }
}

fn errno_msg(path: &str, e: kcache_fs::Errno) -> String {
    format!("{path}: {}", std::io::Error::from_raw_os_error(e.0))
}

/// Carries out one request. `reader` is a connection for long read-only queries, so they do
/// not hold up the filesystem's own connection (the daemon passes a read-only store; an
/// unmounted store passes itself). Long requests report how far they are to `progress`.
pub fn handle(
    fs: &KcacheFs,
    reader: &Store,
    mounted: &[String],
    req: Request,
    progress: &mut dyn FnMut(&PushProgress),
) -> Result<Reply, String> {
    let check_volume = |v: &Option<String>| -> Result<(), String> {
        match v {
            Some(v) if *v != fs.volume().name => Err(format!(
                "this store is mounted with volume '{}', not '{v}'; use its mountpoint or that volume",
                fs.volume().name
            )),
            _ => Ok(()),
        }
    };
    let store = fs.store();
    // `reader` sees only committed transactions: answer as of now, not as of the last
    // group commit.
    store.commit_group().map_err(|e| e.to_string())?;
    match req {
        Request::Stats => {
            store.lru().flush_accesses().map_err(|e| e.to_string())?;
            store.commit_group().map_err(|e| e.to_string())?;
            let st = reader.stats().map_err(|e| e.to_string())?;
            let usage = fs.usage().map_err(|e| errno_msg("usage", e))?;
            Ok(Reply::Stats(StatsReply {
                store: st,
                disk_available_bytes: usage.disk_available,
                min_free_bytes: usage.min_free,
                volume: fs.volume().name.clone(),
                transport: fs.transport().into(),
                sync: reader.sync_statuses().map_err(|e| e.to_string())?,
                halted: store.halted().map(str::to_owned),
            }))
        }
        Request::Limits { set } => {
            if let Some(m) = set {
                let l = Limits::try_from(m)?;
                fs.set_limits(l).map_err(|e| errno_msg("limits", e))?;
            }
            Ok(Reply::Limits(LimitsMsg::from(fs.limits())))
        }
        Request::Evict {
            to,
            older_than_secs,
        } => {
            if to.is_none() && older_than_secs.is_none() {
                return Err("nothing to evict by: give a target size or an age".into());
            }
            let used_before = older_than_secs.map(|s| {
                kcache_store::now_ns().saturating_sub((s as i64).saturating_mul(1_000_000_000))
            });
            let ev = fs
                .evict(EvictPolicy {
                    target: to,
                    used_before,
                })
                .map_err(|e| errno_msg("evict", e))?;
            let left = store.stored_bytes().map_err(|e| e.to_string())?;
            Ok(Reply::Evicted(EvictReply {
                blobs: ev.blobs,
                bytes: ev.bytes,
                names: ev.names.len() as u64,
                usage_bytes: left,
            }))
        }
        Request::Gc => Ok(Reply::Gc(fs.gc().map_err(|e| errno_msg("gc", e))?)),
        Request::Clear { volume, path } => {
            check_volume(&volume)?;
            let n = fs.clear(&path).map_err(|e| errno_msg(&path, e))?;
            Ok(Reply::Cleared { removed: n })
        }
        Request::Pin { volume, paths } => {
            check_volume(&volume)?;
            let mut pinned = 0;
            for p in &paths {
                let ino = fs.resolve(p).map_err(|e| errno_msg(p, e))?;
                pinned = store.pin(ino).map_err(|e| format!("{p}: {e}"))?;
            }
            Ok(Reply::Pinned {
                pinned_bytes: pinned,
            })
        }
        Request::Unpin { volume, paths } => {
            check_volume(&volume)?;
            for p in &paths {
                fs.unpin(p).map_err(|e| match e.0 {
                    libc::ENOENT => format!("{p}: not pinned (or no such path)"),
                    _ => errno_msg(p, e),
                })?;
            }
            Ok(Reply::Unpinned {
                unpinned: paths.len() as u64,
            })
        }
        Request::Pins { volume } => {
            check_volume(&volume)?;
            let pins = fs.pins().map_err(|e| errno_msg("pins", e))?;
            let bytes = reader.pinned_blobs().map_err(|e| e.to_string())?.1;
            Ok(Reply::Pins(PinsReply {
                pins,
                pinned_bytes: bytes,
            }))
        }
        Request::Du {
            volume,
            path,
            depth,
        } => {
            check_volume(&volume)?;
            let ino = reader
                .resolve(fs.volume().root, &path)
                .map_err(|e| format!("{path}: {e}"))?;
            Ok(Reply::Du(reader.du(ino, depth).map_err(|e| e.to_string())?))
        }
        Request::VolumeCreate { name } => {
            if store.volume(&name, false, 0, 0).is_ok() {
                return Err(format!("volume '{name}' already exists"));
            }
            // The new volume's root belongs to the store's owner (the daemon's user).
            // SAFETY: getuid/getgid have no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            store
                .volume(&name, true, uid, gid)
                .map_err(|e| format!("creating volume '{name}': {e}"))?;
            Ok(Reply::VolumeCreated { created: name })
        }
        Request::VolumeList => Ok(Reply::Volumes(
            reader.volume_summaries().map_err(|e| e.to_string())?,
        )),
        Request::VolumeRm { name } => {
            if mounted.contains(&name) {
                return Err(format!(
                    "volume '{name}' is mounted; unmount it before removing it"
                ));
            }
            let files = store
                .remove_volume(&name)
                .map_err(|e| format!("removing volume '{name}': {e}"))?;
            Ok(Reply::VolumeRemoved {
                removed: name,
                files,
            })
        }
        Request::VolumeClone { src, dst } => {
            let t = std::time::Instant::now();
            store.clone_volume(&src, &dst).map_err(|e| match e {
                kcache_store::Error::Exists => format!("volume '{dst}' already exists"),
                e => format!("cloning volume '{src}' to '{dst}': {e}"),
            })?;
            Ok(Reply::VolumeCloned {
                cloned: src,
                to: dst,
                seconds: t.elapsed().as_secs_f64(),
            })
        }
        Request::Push {
            volume,
            upstream,
            tag,
            sign,
            env,
            replace,
        } => {
            let up = kcache_store::Upstream::parse_with(
                &upstream,
                kcache_store::FetchConfig::default().timeout,
                command_env(&env).as_deref(),
            )?;
            let r = store
                .push_with(
                    &up,
                    &volume,
                    &tag,
                    sign.as_ref().map(|s| &s.0[..]),
                    replace,
                    progress,
                )
                .map_err(|e| format!("pushing volume '{volume}' to {upstream}: {e}"))?;
            Ok(Reply::Pushed(r))
        }
        Request::Pull {
            volume,
            upstream,
            tag,
            trusted_keys,
            env,
            mode,
        } => {
            let live = mounted.contains(&volume);
            if live && mode == PullMode::Replace {
                return Err(format!(
                    "volume '{volume}' is mounted: --replace would take every name away from \
                     under its users; unmount it first, or merge (without --replace)"
                ));
            }
            let up = kcache_store::Upstream::parse_with(
                &upstream,
                kcache_store::FetchConfig::default().timeout,
                command_env(&env).as_deref(),
            )?;
            let remote = kcache_store::Remote::new(vec![up.clone()], Default::default())
                .map_err(|e| e.to_string())?;
            // Keys given now are remembered: once a store trusts a key, it never again takes
            // an unsigned snapshot.
            for k in &trusted_keys {
                store.add_trusted_key(k).map_err(|e| e.to_string())?;
            }
            let trusted = store.trusted_keys().map_err(|e| e.to_string())?;
            let failed = |e: kcache_store::Error| {
                format!("pulling {upstream}:{tag} into volume '{volume}': {e}")
            };
            let r = match mode {
                PullMode::Merge { theirs } if fs.volume().name == volume => fs
                    .pull_merge(&remote, &tag, &trusted, theirs)
                    .map_err(failed)?,
                PullMode::Merge { theirs } if store.volume(&volume, false, 0, 0).is_ok() => {
                    if live {
                        return Err(format!(
                            "volume '{volume}' is mounted, but not by this filesystem"
                        ));
                    }
                    // Not mounted: the same merge, through a filesystem no kernel knows.
                    let info = store.volume(&volume, false, 0, 0).map_err(failed)?;
                    fs.sibling(info, false)
                        .pull_merge(&remote, &tag, &trusted, theirs)
                        .map_err(failed)?
                }
                mode => {
                    store
                        .pull_with(&remote, &tag, &volume, &trusted, mode)
                        .map_err(failed)?
                        .report
                }
            };
            store
                .add_upstream_setting(&upstream)
                .map_err(|e| e.to_string())?;
            // A live volume's new names are fetched on open: a store with no upstream yet
            // takes this one (a mount's own upstream= list stays as it is).
            if live {
                fs.adopt_remote_if_none(std::sync::Arc::new(
                    kcache_store::Remote::new(vec![up], Default::default())
                        .map_err(|e| e.to_string())?,
                ));
            }
            Ok(Reply::Pulled(r))
        }
        Request::Mount { .. } | Request::Mounts => {
            Err("the store is not mounted (no daemon to ask)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::Arc;

    use kcache_fs::{Ctx, ROOT_INO};

    use super::*;

    fn write_file(fs: &KcacheFs, name: &str, data: &[u8]) {
        let ctx = Ctx {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let (_, o) = fs
            .create(
                ROOT_INO,
                OsStr::new(name),
                0o644,
                libc::O_WRONLY | libc::O_CREAT,
                ctx,
                false,
                None,
            )
            .unwrap();
        fs.write(o.fh, 0, data).unwrap();
        fs.release(o.fh).unwrap();
    }

    /// Every request the handler serves gives a reply that, sent over the wire, reads back as
    /// the same reply: the type the command reads is the type the handler built.
    #[test]
    fn every_reply_reads_back_as_what_the_handler_built() {
        let dir = tempfile::tempdir().unwrap();
        let up = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let vol = store.volume("default", true, 0, 0).unwrap();
        let fs = KcacheFs::new(store.clone(), vol, false);
        write_file(&fs, "a", b"some bytes");
        write_file(&fs, "b", b"other bytes");
        let upstream = format!("file://{}", up.path().display());
        let requests = vec![
            Request::Stats,
            Request::Limits { set: None },
            Request::Limits {
                set: Some(LimitsMsg {
                    quota: Some(1 << 30),
                    low_watermark_pct: 80,
                    min_free: "5%".into(),
                }),
            },
            Request::Pin {
                volume: None,
                paths: vec!["a".into()],
            },
            Request::Pins { volume: None },
            Request::Unpin {
                volume: None,
                paths: vec!["a".into()],
            },
            Request::Du {
                volume: None,
                path: String::new(),
                depth: 1,
            },
            Request::VolumeCreate { name: "v2".into() },
            Request::VolumeClone {
                src: "default".into(),
                dst: "v3".into(),
            },
            Request::VolumeList,
            Request::Push {
                volume: "default".into(),
                upstream: upstream.clone(),
                tag: "t".into(),
                sign: None,
                env: vec![],
                replace: false,
            },
            Request::Pull {
                volume: "v4".into(),
                upstream: upstream.clone(),
                tag: "t".into(),
                trusted_keys: vec![],
                env: vec![],
                mode: PullMode::Replace,
            },
            // A merge into the volume the filesystem serves: every name is unchanged.
            Request::Pull {
                volume: "default".into(),
                upstream: upstream.clone(),
                tag: "t".into(),
                trusted_keys: vec![],
                env: vec![],
                mode: PullMode::default(),
            },
            Request::VolumeRm { name: "v2".into() },
            Request::Clear {
                volume: None,
                path: "b".into(),
            },
            Request::Evict {
                to: Some(0),
                older_than_secs: None,
            },
            Request::Gc,
        ];
        let mut kinds = Vec::new();
        for req in requests {
            let name = req.name();
            let reply = handle(&fs, &store, &[], req.clone(), &mut |_| {})
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let wire = serde_json::to_value(&reply).unwrap();
            let back = Reply::decode(&req, wire.clone())
                .unwrap_or_else(|e| panic!("{name}: {e} in {wire}"));
            assert_eq!(back, reply, "{name}");
            kinds.push(reply.kind());
        }
        assert_eq!(
            kinds,
            [
                "stats",
                "limits",
                "limits",
                "pinned",
                "pins",
                "unpinned",
                "du",
                "volume created",
                "volume cloned",
                "volumes",
                "pushed",
                "pulled",
                "pulled",
                "volume removed",
                "cleared",
                "evicted",
                "gc"
            ]
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_its_request_is_an_error() {
        let v = serde_json::json!({"removed": 3});
        assert!(Reply::decode(&Request::Stats, v.clone()).is_err());
        assert_eq!(
            Reply::decode(
                &Request::Clear {
                    volume: None,
                    path: "x".into()
                },
                v
            )
            .unwrap(),
            Reply::Cleared { removed: 3 }
        );
    }
}
