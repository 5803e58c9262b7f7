//! The crash contract under `kill -9` of the daemon at random moments, round after round on
//! one store: mixed creates, writes, renames, hard links, unlinks, directory creation, file
//! and directory fsyncs, writes to a file another handle keeps open, and files unlinked while
//! still open for writing. After each crash the
//! restarted mount must show a consistent prefix of what was done (never an operation without
//! the ones before it), nothing older than the group-commit bound or covered by a finished
//! fsync may be missing, and every file must hold a whole version of what was written to it
//! (only the write cut by the crash may show part of its bytes).
//!
//! `KCACHE_CRASH_ROUNDS` sets the number of rounds (default 200), `KCACHE_CRASH_SEED` the
//! seed (default: the time); a failure names both, so it can be replayed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kcache_tests::{pseudo_random, Mount, GROUP_COMMIT_BOUND};

/// splitmix64: deterministic choices from a seed, so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize].clone()
    }
}

/// A new name in directory `d` (relative to the round's directory; "" is the round's).
fn fresh_name(next: &mut u32, d: &str, prefix: &str) -> String {
    *next += 1;
    if d.is_empty() {
        format!("{prefix}{next}")
    } else {
        format!("{d}/{prefix}{next}")
    }
}

/// Rewrites `path` in place (O_TRUNC) with `bytes`; the handle stays open.
fn rewrite(path: &Path, bytes: &[u8]) -> std::io::Result<fs::File> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(f)
}

fn fsync_path(path: &Path) -> std::io::Result<()> {
    fs::File::open(path)?.sync_all()
}

/// Version `ver` (1, 2, ...) of model inode `ino`'s content in round `round`: a header that
/// names it, then pseudo-random bytes of a length of its own. Version 0 is the empty file.
fn body(round: u64, ino: u32, ver: u32) -> Vec<u8> {
    if ver == 0 {
        return Vec::new();
    }
    let seed = round << 32 ^ (ino as u64) << 16 ^ ver as u64;
    let mut r = Rng(seed);
    // Mostly small files, some spanning several FUSE writes.
    let len = if r.chance(10) {
        64 * 1024 + r.below(256 * 1024)
    } else {
        r.below(16 * 1024)
    } as usize;
    let mut b = format!("r{round}i{ino}v{ver}|").into_bytes();
    b.extend_from_slice(&pseudo_random(seed, len));
    b
}

/// One change the worker made, as the model applies it.
#[derive(Clone, Debug)]
enum Step {
    /// A new empty file (open with O_CREAT | O_EXCL).
    Create {
        path: String,
        ino: u32,
    },
    /// Content version `ver` written to `ino` (through a new handle, or the creating one).
    Write {
        ino: u32,
        ver: u32,
    },
    Rename {
        from: String,
        to: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    /// A finished fsync of a file or a directory: everything before it must survive.
    Fsync,
}

/// The namespace and contents after some prefix of the steps.
#[derive(Clone, Default, Debug)]
struct Model {
    /// Path (relative to the round's directory) to model inode; directories have none.
    files: BTreeMap<String, u32>,
    dirs: Vec<String>,
    /// The content version of each inode.
    ver: HashMap<u32, u32>,
}

impl Model {
    fn apply(&mut self, s: &Step) {
        match s {
            Step::Create { path, ino } => {
                self.files.insert(path.clone(), *ino);
                self.ver.insert(*ino, 0);
            }
            Step::Write { ino, ver } => {
                self.ver.insert(*ino, *ver);
            }
            Step::Rename { from, to } => {
                let ino = self.files.remove(from).expect("renamed file exists");
                self.files.insert(to.clone(), ino);
            }
            Step::Link { from, to } => {
                let ino = self.files[from];
                self.files.insert(to.clone(), ino);
            }
            Step::Unlink { path } => {
                self.files.remove(path);
            }
            Step::Mkdir { path } => self.dirs.push(path.clone()),
            Step::Fsync => {}
        }
    }

    fn at(base: &Model, steps: &[Step]) -> Model {
        let mut m = base.clone();
        for s in steps {
            m.apply(s);
        }
        m
    }
}

/// A step as the worker ran it: when it finished, or None if it failed (the crash cut it).
struct Done {
    step: Step,
    finished: Option<Instant>,
}

/// What a directory tree holds after the restart.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Path to (st_ino, st_nlink, content).
    files: BTreeMap<String, (u64, u64, Vec<u8>)>,
    dirs: Vec<String>,
}

fn walk(root: &Path) -> Seen {
    fn go(root: &Path, rel: &str, seen: &mut Seen) {
        let dir = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(rel)
        };
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().into_string().unwrap();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                seen.dirs.push(path.clone());
                go(root, &path, seen);
            } else {
                let content = fs::read(e.path())
                    .unwrap_or_else(|err| panic!("reading {path} after the crash: {err}"));
                seen.files.insert(path, (meta.ino(), meta.nlink(), content));
            }
        }
    }
    let mut seen = Seen {
        files: BTreeMap::new(),
        dirs: Vec::new(),
    };
    go(root, "", &mut seen);
    seen.dirs.sort();
    seen
}

/// Whether the namespace seen is the model's: the same files and directories, and names
/// share an inode exactly where the model's do, with the link count that implies.
fn same_namespace(m: &Model, seen: &Seen) -> bool {
    let mut dirs = m.dirs.clone();
    dirs.sort();
    if dirs != seen.dirs || m.files.len() != seen.files.len() {
        return false;
    }
    let mut to_real: HashMap<u32, u64> = HashMap::new();
    let mut to_model: HashMap<u64, u32> = HashMap::new();
    let mut names: HashMap<u32, u64> = HashMap::new();
    for (path, ino) in &m.files {
        let Some((real, _, _)) = seen.files.get(path) else {
            return false;
        };
        if *to_real.entry(*ino).or_insert(*real) != *real
            || *to_model.entry(*real).or_insert(*ino) != *ino
        {
            return false;
        }
        *names.entry(*ino).or_default() += 1;
    }
    m.files
        .iter()
        .all(|(path, ino)| seen.files[path].1 == names[ino])
}

/// Checks every visible file's content against what the model allows at prefix `m`:
/// a whole version no older than the model's and no newer than the last one written (a
/// file's staged bytes survive a crash apart from the namespace's group commit), or part of
/// the version the crash cut off.
fn check_contents(
    round: u64,
    m: &Model,
    seen: &Seen,
    newest: &HashMap<u32, u32>,
    cut: Option<(u32, u32)>,
) -> Result<(), String> {
    for (path, ino) in &m.files {
        let content = &seen.files[path].2;
        let low = m.ver[ino];
        let high = newest.get(ino).copied().unwrap_or(0).max(low);
        if (low..=high).any(|v| body(round, *ino, v) == *content) {
            continue;
        }
        if let Some((cut_ino, cut_ver)) = cut {
            if cut_ino == *ino && body(round, *ino, cut_ver).starts_with(content) {
                continue;
            }
        }
        let head = String::from_utf8_lossy(&content[..content.len().min(24)]).into_owned();
        return Err(format!(
            "{path} (model inode {ino}) holds {} bytes starting {head:?}: not a whole version \
             {low}..={high} of it{}",
            content.len(),
            match cut {
                Some((i, v)) if i == *ino => format!(", nor part of version {v}"),
                _ => String::new(),
            }
        ));
    }
    Ok(())
}

/// The worker: runs random steps in `dir` until one fails (the daemon is gone), holding
/// `held` open read-write the whole time so its writes are not committed at their close.
fn work(dir: &Path, round: u64, seed: u64, base: &Model) -> Vec<Done> {
    let mut rng = Rng(seed);
    let mut m = base.clone();
    let mut log: Vec<Done> = Vec::new();
    let mut next_ino = m.files.values().max().map_or(0, |i| i + 1);
    let mut next_name = 0u32;
    let _holder = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("held"));
    // Runs one step: the I/O, then the model, and the log entry either way.
    macro_rules! step {
        ($s:expr, $io:expr) => {{
            let s: Step = $s;
            let r: std::io::Result<_> = $io;
            match r {
                Ok(v) => {
                    m.apply(&s);
                    log.push(Done {
                        step: s,
                        finished: Some(Instant::now()),
                    });
                    v
                }
                Err(_) => {
                    log.push(Done {
                        step: s,
                        finished: None,
                    });
                    return log;
                }
            }
        }};
    }
    for _ in 0..10_000 {
        let files: Vec<(String, u32)> = m
            .files
            .iter()
            .filter(|(p, _)| p.as_str() != "held" && !p.contains(".tmp"))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        let mut dirs = vec![String::new()];
        dirs.extend(m.dirs.iter().cloned());
        let roll = rng.below(100);
        if roll < 40 || files.is_empty() {
            // A new file: temp name, write, maybe fsync, close, rename over a new or an
            // existing name, maybe fsync the directory.
            let tmp = fresh_name(&mut next_name, &rng.pick(&dirs), ".tmp");
            let ino = next_ino;
            next_ino += 1;
            let mut f = step!(
                Step::Create {
                    path: tmp.clone(),
                    ino
                },
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join(&tmp))
            );
            step!(
                Step::Write { ino, ver: 1 },
                f.write_all(&body(round, ino, 1))
            );
            if rng.chance(20) {
                step!(Step::Fsync, f.sync_all());
            }
            drop(f);
            let to = if !files.is_empty() && rng.chance(30) {
                rng.pick(&files).0
            } else {
                fresh_name(&mut next_name, &rng.pick(&dirs), "f")
            };
            step!(
                Step::Rename {
                    from: tmp.clone(),
                    to: to.clone()
                },
                fs::rename(dir.join(&tmp), dir.join(&to))
            );
            if rng.chance(15) {
                let parent = Path::new(&to).parent().unwrap().to_owned();
                step!(Step::Fsync, fsync_path(&dir.join(parent)));
            }
        } else if roll < 55 {
            // A rewrite in place (O_TRUNC), of the held file or another.
            let (path, ino) = if rng.chance(50) {
                ("held".to_owned(), m.files["held"])
            } else {
                rng.pick(&files)
            };
            let ver = m.ver[&ino] + 1;
            let f = step!(
                Step::Write { ino, ver },
                rewrite(&dir.join(&path), &body(round, ino, ver))
            );
            if rng.chance(20) {
                step!(Step::Fsync, f.sync_all());
            }
        } else if roll < 65 {
            let (from, _) = rng.pick(&files);
            let to = fresh_name(&mut next_name, &rng.pick(&dirs), "l");
            step!(
                Step::Link {
                    from: from.clone(),
                    to: to.clone()
                },
                fs::hard_link(dir.join(&from), dir.join(&to))
            );
        } else if roll < 75 {
            let (path, _) = rng.pick(&files);
            step!(
                Step::Unlink { path: path.clone() },
                fs::remove_file(dir.join(&path))
            );
        } else if roll < 85 {
            // A move to another name, maybe in another directory.
            let (from, _) = rng.pick(&files);
            let to = fresh_name(&mut next_name, &rng.pick(&dirs), "m");
            step!(
                Step::Rename {
                    from: from.clone(),
                    to: to.clone()
                },
                fs::rename(dir.join(&from), dir.join(&to))
            );
        } else if roll < 90 && m.dirs.len() < 4 {
            let path = fresh_name(&mut next_name, "", "d");
            step!(
                Step::Mkdir { path: path.clone() },
                fs::create_dir(dir.join(&path))
            );
        } else if roll < 92 {
            // A write, then the file's last-but-maybe-not-only name goes while it is still
            // open, then the close (whose staged bytes die with the inode, if it has no name).
            let (path, ino) = rng.pick(&files);
            let ver = m.ver[&ino] + 1;
            let f = step!(
                Step::Write { ino, ver },
                rewrite(&dir.join(&path), &body(round, ino, ver))
            );
            step!(
                Step::Unlink { path: path.clone() },
                fs::remove_file(dir.join(&path))
            );
            drop(f);
        } else if roll < 95 {
            // fsync of a file closed earlier (its content committed at the close).
            let (path, _) = rng.pick(&files);
            step!(Step::Fsync, fsync_path(&dir.join(path)));
        } else {
            step!(Step::Fsync, fsync_path(&dir.join(rng.pick(&dirs))));
        }
    }
    log
}

/// One round: a fresh directory whose held file is committed and durable, the worker in it,
/// a `kill -9` after `delay`, the restart, and the check. Returns what the directory holds
/// and how many steps were done before the crash.
fn round(m: &mut Mount, round: u64, seed: u64, delay: Duration) -> (Seen, usize) {
    let rel = format!("r{round}");
    let dir = m.path(&rel);
    fs::create_dir(&dir).unwrap();
    let mut base = Model::default();
    base.apply(&Step::Create {
        path: "held".into(),
        ino: 0,
    });
    base.apply(&Step::Write { ino: 0, ver: 1 });
    fs::write(dir.join("held"), body(round, 0, 1)).unwrap();
    kcache_tests::wait_until("the held file committed", 10, || m.staging_files() == 0);
    fs::File::open(&dir).unwrap().sync_all().unwrap();

    let worker = {
        let (dir, base) = (dir.clone(), base.clone());
        std::thread::spawn(move || work(&dir, round, seed, &base))
    };
    std::thread::sleep(delay);
    let killed = Instant::now();
    m.kill9_now();
    let log = worker.join().unwrap();
    m.restart_after_crash();
    let seen = walk(&dir);

    let steps: Vec<Step> = log.iter().map(|d| d.step.clone()).collect();
    let done = log.iter().take_while(|d| d.finished.is_some()).count();
    // The prefix must reach past every finished fsync and every step finished more than the
    // bound before the kill (four times over: the committing thread can run late on a
    // loaded machine).
    let mut k_min = 0;
    for (i, d) in log.iter().enumerate() {
        let Some(t) = d.finished else { break };
        if matches!(d.step, Step::Fsync) || killed.duration_since(t) > 4 * GROUP_COMMIT_BOUND {
            k_min = i + 1;
        }
    }
    let cut = match log.get(done).map(|d| &d.step) {
        Some(Step::Write { ino, ver }) => Some((*ino, *ver)),
        _ => None,
    };
    let mut newest: HashMap<u32, u32> = HashMap::new();
    for d in &log[..done] {
        if let Step::Write { ino, ver } = d.step {
            newest.insert(ino, ver);
        }
    }
    // The first prefix at or past k_min whose namespace is the one seen (the step cut by
    // the crash may have happened: up to the whole log).
    let mut model = Model::at(&base, &steps[..k_min]);
    let at_min = model.files.clone();
    let mut last_err = None;
    for k in k_min..=steps.len() {
        if k > k_min {
            model.apply(&steps[k - 1]);
        }
        if !same_namespace(&model, &seen) {
            continue;
        }
        match check_contents(round, &model, &seen, &newest, cut) {
            Ok(()) => return (seen, done),
            Err(e) => last_err = Some(format!("prefix {k}: {e}")),
        }
    }
    let why = last_err.unwrap_or_else(|| {
        format!("no prefix of at least {k_min} steps has this namespace; at {k_min}: {at_min:?}")
    });
    let log = m.log_text();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "round {round} (seed {seed}, kill after {delay:?}, {done} steps done of {}): {why}\n\
         steps: {steps:#?}\nseen: {:?}\ndaemon log (last lines):\n{}",
        steps.len(),
        seen.files
            .iter()
            .map(|(p, (i, n, c))| (p, i, n, c.len()))
            .collect::<Vec<_>>(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

#[test]
fn kill_9_at_random_moments_keeps_a_whole_prefix_of_what_was_done() {
    let Some(mut m) = Mount::new() else { return };
    let rounds: u64 = std::env::var("KCACHE_CRASH_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("KCACHE_CRASH_ROUNDS is a number"))
        .unwrap_or(200);
    let seed: u64 = std::env::var("KCACHE_CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("KCACHE_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash rounds: {rounds}, seed {seed}");
    let mut timing = Rng(seed);
    let mut previous: Option<(String, Seen)> = None;
    let mut steps_done = 0usize;
    for r in 0..rounds {
        // Mostly from at once to past several group commits; one round in four runs past
        // four times the bound, so that steps older than it (writes to the held file among
        // them) must survive.
        let delay = if timing.below(4) == 0 {
            Duration::from_millis(500 + timing.below(1000))
        } else {
            Duration::from_millis(timing.below(300))
        };
        let (seen, done) = round(&mut m, r, seed.wrapping_add(r), delay);
        steps_done += done;
        // What one restart showed, the next crash and restart must show again.
        if let Some((rel, before)) = previous.take() {
            assert_eq!(
                walk(&m.path(&rel)),
                before,
                "{rel} changed across a later crash (seed {seed})"
            );
        }
        previous = Some((format!("r{r}"), seen));
    }
    m.unmount();
    let (ok, out) = m.verify();
    assert!(ok, "verify after {rounds} crashes (seed {seed}): {out}");
    eprintln!("{steps_done} steps done in {rounds} rounds");
    assert!(
        steps_done > rounds as usize,
        "the rounds did almost nothing"
    );
}
