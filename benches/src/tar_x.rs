//! The `tar-x` workload: the real GNU tar extracting a generated source tree into each
//! target, as a package manager or a build unpacking sources would.
//!
//! The tarball is written once per run, outside any timer, by `tar` itself from a tree
//! generated in the scratch dir; each pass then extracts it into a fresh directory of each
//! target, and the extracted tree is checked against the plan it was generated from.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::mounts::{describe, run_to_file};
use crate::requests::{per_file, Probe};
use crate::workloads::{
    check_interrupted, close_checked, human_size, sync_all_filesystems, Amount, Phase, Prng,
};

/// The real binary, not whatever `tar` is first on PATH: the point is GNU tar's own
/// sequence of system calls.
const TAR: &str = "/usr/bin/tar";

/// The tarball's top directory; extraction creates it inside the destination.
const TOP: &str = "tree";

/// The tree's shape (layout, names, sizes) comes from this fixed seed, so every run and
/// every machine extracts the same shape; only the contents vary with the run's seed.
const SHAPE_SEED: u64 = 0x7A72_2D78_5348_4150;

/// Directories below the top one; deeper than this they only hold files.
const MAX_DEPTH: usize = 4;

/// A hung file system would otherwise hang the benchmark with tar.
const TAR_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Names that make the tree look like the sources it stands for (names only: the kind of
/// name changes nothing for the file system, but the lengths are realistic).
const DIR_NAMES: [&str; 10] = [
    "src", "lib", "include", "tests", "docs", "util", "core", "net", "io", "fmt",
];
const FILE_STEMS: [&str; 8] = [
    "main", "mod", "parser", "buffer", "config", "handler", "types", "test",
];
const FILE_EXTS: [&str; 7] = ["c", "h", "rs", "py", "md", "txt", "json"];

enum Kind {
    Dir,
    /// The content is `len` bytes from a `Prng` seeded with `seed`, distinct per file.
    File {
        len: usize,
        seed: u64,
    },
    /// Relative, to a file in the same directory.
    Symlink {
        target: String,
    },
}

/// One entry of the tree, by its path relative to the extraction's destination. Parents
/// come before their contents.
struct Entry {
    path: PathBuf,
    kind: Kind,
}

/// A tarball of a generated source tree and the plan to check an extraction against.
pub struct Tarball {
    path: PathBuf,
    /// Where tar's output goes (it prints nothing when all is well).
    log: PathBuf,
    entries: Vec<Entry>,
    files: usize,
}

impl Tarball {
    /// Generates a tree of `files` files in `dir`, with contents from `seed`, and has tar
    /// write it to `dir/tree.tar`. Prints what it made.
    pub fn create(dir: &Path, files: usize, seed: u64) -> Result<Self> {
        let start = Instant::now();
        let entries = plan(files, seed);
        let source = dir.join("source");
        fs::create_dir(&source).with_context(|| format!("creating {}", source.display()))?;
        let mut bytes = 0u64;
        for e in &entries {
            check_interrupted()?;
            let p = source.join(&e.path);
            match &e.kind {
                Kind::Dir => {
                    fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?
                }
                Kind::File { len, seed } => {
                    let mut f =
                        File::create(&p).with_context(|| format!("creating {}", p.display()))?;
                    f.write_all(&content(*len, *seed))
                        .with_context(|| format!("writing {}", p.display()))?;
                    close_checked(f, &p)?;
                    bytes += *len as u64;
                }
                Kind::Symlink { target } => std::os::unix::fs::symlink(target, &p)
                    .with_context(|| format!("creating symlink {}", p.display()))?,
            }
        }
        let tarball = Self {
            path: dir.join("tree.tar"),
            log: dir.join("tar.log"),
            entries,
            files,
        };
        // Sorted by name, so the archive's order does not depend on the order readdir
        // happened to return.
        let mut cmd = Command::new(TAR);
        cmd.arg("--create")
            .arg("--sort=name")
            .arg("--file")
            .arg(&tarball.path)
            .arg("-C")
            .arg(&source)
            .arg(TOP);
        tarball.run_tar(&mut cmd)?;
        let dirs = tarball.count(|k| matches!(k, Kind::Dir));
        let links = tarball.count(|k| matches!(k, Kind::Symlink { .. }));
        let size = fs::metadata(&tarball.path)
            .with_context(|| format!("stat {}", tarball.path.display()))?
            .len();
        println!(
            "  tarball: {files} files ({} of data), {dirs} dirs, {links} symlinks; {} \
             (made in {:.1} s)",
            human_size(bytes as usize),
            human_size(size as usize),
            start.elapsed().as_secs_f64()
        );
        Ok(tarball)
    }

    fn count(&self, pred: impl Fn(&Kind) -> bool) -> usize {
        self.entries.iter().filter(|e| pred(&e.kind)).count()
    }

    /// Runs tar with its output in the log: a non-zero exit or anything printed (a
    /// warning means the extraction differed from a clean one) is an error.
    fn run_tar(&self, cmd: &mut Command) -> Result<()> {
        let what = describe(cmd);
        match fs::remove_file(&self.log) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.log.display())),
        }
        let status = run_to_file(cmd, &self.log, TAR_TIMEOUT)?;
        let output = fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        if !status.success() || !output.trim().is_empty() {
            bail!("`{what}` failed ({status}): {}", output.trim());
        }
        Ok(())
    }

    /// The timed part: `tar -xf TARBALL -C DEST` into the empty directory `dest`; then,
    /// untimed, a check of everything it extracted.
    pub fn extract(&self, dest: &Path, probe: Option<&Probe>) -> Result<Vec<Phase>> {
        let read = || probe.map(|p| p.counts()).transpose();
        let mut cmd = Command::new(TAR);
        cmd.arg("-xf").arg(&self.path).arg("-C").arg(dest);
        sync_all_filesystems();

        let c0 = read()?;
        let start = Instant::now();
        self.run_tar(&mut cmd)?;
        let secs = start.elapsed().as_secs_f64();
        let c1 = read()?;

        self.verify(dest)?;
        Ok(vec![Phase {
            label: format!("tar -x of a source tree: {} files", self.files),
            goal: Some(0.4),
            max_secs: None,
            amount: Amount::Files(self.files as u64),
            secs,
            requests: match (c0, c1) {
                (Some(a), Some(b)) => Some(per_file(&a, &b, self.files)),
                _ => None,
            },
        }])
    }

    /// Every planned entry is there with its kind and contents, and nothing else is.
    fn verify(&self, dest: &Path) -> Result<()> {
        for e in &self.entries {
            check_interrupted()?;
            let p = dest.join(&e.path);
            let meta = fs::symlink_metadata(&p)
                .with_context(|| format!("stat {} after extraction", p.display()))?;
            match &e.kind {
                Kind::Dir => ensure!(meta.is_dir(), "{}: not a directory", p.display()),
                Kind::File { len, seed } => {
                    ensure!(meta.is_file(), "{}: not a regular file", p.display());
                    let got = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    ensure!(
                        got == content(*len, *seed),
                        "{}: wrong contents ({} bytes, expected {len})",
                        p.display(),
                        got.len()
                    );
                }
                Kind::Symlink { target } => {
                    ensure!(meta.is_symlink(), "{}: not a symlink", p.display());
                    let got = fs::read_link(&p)
                        .with_context(|| format!("reading link {}", p.display()))?;
                    ensure!(
                        got == Path::new(target),
                        "{}: points to {}, expected {target}",
                        p.display(),
                        got.display()
                    );
                }
            }
        }
        let found = count_entries(dest)?;
        ensure!(
            found == self.entries.len(),
            "{}: {found} entries after extraction, expected {}",
            dest.display(),
            self.entries.len()
        );
        Ok(())
    }
}

/// Entries below `dir`, recursively, without following symlinks.
fn count_entries(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        n += 1;
        if entry.file_type()?.is_dir() {
            n += count_entries(&entry.path())?;
        }
    }
    Ok(n)
}

fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Prng::new(seed).fill(&mut data);
    data
}

/// The tree: directories visited breadth first, each given 10-40 files (the last one
/// fewer) and up to three subdirectories; when the queue runs dry another top-level
/// package starts, so wide trees stay a few levels deep. About one directory in twenty
/// also holds a symlink to one of its files.
fn plan(files: usize, content_seed: u64) -> Vec<Entry> {
    let mut shape = Prng::new(SHAPE_SEED);
    let mut contents = Prng::new(content_seed);
    let mut entries = vec![Entry {
        path: PathBuf::from(TOP),
        kind: Kind::Dir,
    }];
    let mut queue: VecDeque<(PathBuf, usize)> = VecDeque::new();
    let (mut made, mut packages) = (0usize, 0usize);
    while made < files {
        let (dir, depth) = queue.pop_front().unwrap_or_else(|| {
            packages += 1;
            (Path::new(TOP).join(format!("pkg{packages:03}")), 1)
        });
        entries.push(Entry {
            path: dir.clone(),
            kind: Kind::Dir,
        });
        let n = (10 + below(&mut shape, 31)).min(files - made);
        let first = made;
        for _ in 0..n {
            let stem = FILE_STEMS[below(&mut shape, FILE_STEMS.len())];
            let ext = FILE_EXTS[below(&mut shape, FILE_EXTS.len())];
            entries.push(Entry {
                path: dir.join(format!("{stem}_{made:05}.{ext}")),
                kind: Kind::File {
                    len: source_file_size(&mut shape),
                    seed: contents.next_u64(),
                },
            });
            made += 1;
        }
        if below(&mut shape, 20) == 0 {
            let target = entries[entries.len() - n]
                .path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            entries.push(Entry {
                path: dir.join(format!("link_{first:05}")),
                kind: Kind::Symlink { target },
            });
        }
        if depth < MAX_DEPTH {
            for k in 0..below(&mut shape, 4) {
                let name = DIR_NAMES[below(&mut shape, DIR_NAMES.len())];
                queue.push_back((dir.join(format!("{name}{k}")), depth + 1));
            }
        }
    }
    entries
}

/// Like a source tree's files: most between 200 B and 16 KiB, log-uniformly (many small
/// headers, fewer big modules), and 3% between 16 KiB and 256 KiB.
fn source_file_size(rng: &mut Prng) -> usize {
    let (lo, hi) = if below(rng, 100) < 3 {
        (16_384.0, 262_144.0)
    } else {
        (200.0, 16_384.0)
    };
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (lo * f64::powf(hi / lo, u)) as usize
}

/// A number in `0..n` (modulo bias is negligible for these small `n`).
fn below(rng: &mut Prng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_has_the_files_asked_for_in_small_dirs_a_few_levels_deep() {
        let entries = plan(2_000, 1);
        let files: Vec<&Entry> = entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
            .collect();
        assert_eq!(files.len(), 2_000);
        let dirs = entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Dir))
            .count();
        // 10-40 files each, the top dir none.
        assert!((2_000 / 40..=2_000 / 10 + 2).contains(&dirs), "{dirs} dirs");
        assert!(entries
            .iter()
            .all(|e| e.path.components().count() <= MAX_DEPTH + 2));
        assert!(entries
            .iter()
            .any(|e| matches!(e.kind, Kind::Symlink { .. })));
        // Parents come first, so the tree can be written in this order.
        let mut seen = std::collections::HashSet::new();
        for e in &entries {
            if let Some(parent) = e.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                assert!(
                    seen.contains(parent),
                    "{} before its parent",
                    e.path.display()
                );
            }
            assert!(seen.insert(e.path.clone()), "{} twice", e.path.display());
        }
        let sizes: Vec<usize> = files
            .iter()
            .map(|e| match e.kind {
                Kind::File { len, .. } => len,
                _ => 0,
            })
            .collect();
        assert!(sizes.iter().all(|&s| (200..=262_144).contains(&s)));
        let big = sizes.iter().filter(|&&s| s > 16_384).count();
        assert!((1..=200).contains(&big), "{big} files above 16 KiB");
    }

    #[test]
    fn the_shape_is_fixed_and_the_contents_follow_the_seed() {
        let (a, b) = (plan(500, 1), plan(500, 2));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.path, y.path);
            match (&x.kind, &y.kind) {
                (Kind::File { len: l1, seed: s1 }, Kind::File { len: l2, seed: s2 }) => {
                    assert_eq!(l1, l2);
                    assert_ne!(s1, s2);
                }
                (Kind::Dir, Kind::Dir) | (Kind::Symlink { .. }, Kind::Symlink { .. }) => {}
                _ => panic!("{}: kinds differ", x.path.display()),
            }
        }
    }
}
