//! Volume snapshots on an upstream: `push` uploads the blobs an upstream lacks, then a
//! content-addressed manifest of the volume's namespace, then a tag; `pull` turns a manifest
//! into a volume in one transaction, metadata only, with blobs marked remote (fetched on open).

use std::collections::HashMap;
use std::io::{Read, Write};

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fetch::outboard_key;
use crate::manifest::{validate, MInode, Manifest, MANIFEST_VERSION};
use crate::outboard;
use crate::remote::{blob_key, Remote, Upstream};
use crate::{now_ns, Hash, Store};

/// What a signature covers: the manifest's hash, with a context prefix so a signature can
/// never be replayed as anything else.
fn signed_message(manifest_hash: &str) -> Vec<u8> {
    format!("kcache-manifest-v1:{manifest_hash}").into_bytes()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new ed25519 key pair: (secret, public), hex.
pub fn generate_key() -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    // SAFETY: getrandom writes at most len bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != 32 {
        return Err(Error::Remote(
            "no randomness for a new key (getrandom failed)".into(),
        ));
    }
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    Ok((to_hex(&seed), to_hex(key.verifying_key().as_bytes())))
}

/// The public key (hex) of a secret key (hex).
pub fn public_key_of(secret_hex: &str) -> Result<String> {
    let seed = from_hex::<32>(secret_hex).ok_or(Error::Invalid("a secret key is 64 hex digits"))?;
    Ok(to_hex(
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .as_bytes(),
    ))
}

/// Checks the tag's signature lines against the trusted keys: fine when no key is trusted
/// (signatures are then not required) or when a trusted key signed `manifest_hash`.
fn check_signature(
    tag: &str,
    lines: &[&str],
    manifest_hash: &str,
    trusted: &[String],
) -> Result<()> {
    if trusted.is_empty() {
        return Ok(());
    }
    let msg = signed_message(manifest_hash);
    let mut seen = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        let ["sig", "ed25519", key, sig] = f.as_slice() else {
            continue;
        };
        seen.push(key.to_string());
        if !trusted.iter().any(|t| t.eq_ignore_ascii_case(key)) {
            continue;
        }
        let (Some(k), Some(sg)) = (from_hex::<32>(key), from_hex::<64>(sig)) else {
            return Err(Error::Remote(format!(
                "tag {tag}: malformed signature line"
            )));
        };
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&k)
            .map_err(|_| Error::Remote(format!("tag {tag}: bad public key {key}")))?;
        return vk
            .verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&sg))
            .map_err(|_| {
                Error::Remote(format!(
                    "tag {tag}: the signature by trusted key {key} does not verify; refusing the manifest"
                ))
            });
    }
    if seen.is_empty() {
        return Err(Error::Remote(format!(
            "tag {tag} is unsigned, and this store only accepts manifests signed by {}",
            trusted.join(", ")
        )));
    }
    Err(Error::Remote(format!(
        "tag {tag} is signed by {}, which is not a trusted key (trusted: {})",
        seen.join(", "),
        trusted.join(", ")
    )))
}

/// What a push did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PushReport {
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub blobs_present: u64,
    pub manifest: String,
    pub tag: String,
    /// The manifest the tag named before, which this push's snapshot was merged with (None:
    /// a new tag, or `--replace`).
    #[serde(default)]
    pub merged_with: Option<String>,
}

/// How far a push is: blobs (with outboards) and bytes still to upload.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushProgress {
    pub blobs_done: u64,
    pub blobs_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// How a pull changes the volume it goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullMode {
    /// The snapshot's names join the volume's: names only the volume has stay, names only the
    /// snapshot has are added, directories on both sides are merged. A name both have with
    /// different content is a conflict: the volume's is kept, or with `theirs` the
    /// snapshot's replaces it (as a rename over it would: open files keep their content) —
    /// except where one side is a directory and the other not, which is never replaced
    /// (counted as skipped). Same content on both sides is left alone (unchanged).
    Merge { theirs: bool },
    /// The volume becomes the snapshot: everything it held goes (only when not mounted).
    Replace,
}

impl Default for PullMode {
    fn default() -> PullMode {
        PullMode::Merge { theirs: false }
    }
}

/// What a pull did. Names count every directory entry (a directory's and each below it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PullReport {
    pub manifest: String,
    /// Files (inodes) the pull installed.
    pub files: u64,
    /// Distinct blobs those files use, and how many of them are only on the upstream.
    pub blobs: u64,
    pub blobs_remote: u64,
    /// "merge" or "replace".
    #[serde(default)]
    pub mode: String,
    /// Names the snapshot had and the volume did not.
    #[serde(default)]
    pub added: u64,
    /// Names whose local entry the snapshot's replaced (merge with `theirs`).
    #[serde(default)]
    pub updated: u64,
    /// Names with the same content on both sides.
    #[serde(default)]
    pub unchanged: u64,
    /// Conflicting names where the volume's entry was kept (merge without `theirs`).
    #[serde(default)]
    pub kept: u64,
    /// Conflicts between a directory and something else, left as the volume had them.
    #[serde(default)]
    pub skipped: u64,
    /// Names only the volume had, left as they were (a directory counts once, with all
    /// that is in it).
    #[serde(default)]
    pub local_only: u64,
    /// The first few skipped (or kept) paths, for the report.
    #[serde(default)]
    pub conflicts: Vec<String>,
    /// Files the replaced volume held (replace).
    #[serde(default)]
    pub removed: u64,
}

/// A name a merge changed: added, or replaced (`replaced` is the inode it named before and
/// that inode's link count now; 0 means purge it once nothing holds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameChange {
    pub parent: crate::Ino,
    pub name: Vec<u8>,
    pub replaced: Option<(crate::Ino, u32)>,
}

/// What `pull_with` did: the report, and the names of existing directories it changed.
#[derive(Clone, Debug, Default)]
pub struct Pulled {
    pub report: PullReport,
    pub changed: Vec<NameChange>,
}

/// The manifest a tag's pointer names, checked as a pull checks it: the pointer's form, the
/// signature against `trusted`, the manifest's hash, its encoding and its consistency.
/// Returns (manifest hash, manifest).
fn read_pointed(
    remote: &Remote,
    tag: &str,
    pointer: &[u8],
    trusted: &[String],
) -> Result<(String, Manifest)> {
    let pointer = String::from_utf8_lossy(pointer);
    let mut lines = pointer.lines();
    let mhash = lines.next().unwrap_or("").trim().to_owned();
    let rest: Vec<&str> = lines.collect();
    if Hash::from_hex(&mhash).is_none() {
        return Err(Error::Remote(format!(
            "tag {tag} does not name a manifest: {mhash:?}"
        )));
    }
    check_signature(tag, &rest, &mhash, trusted)?;
    let bytes = Store::get_object(remote, &format!("manifests/{mhash}"))?;
    if blake3::hash(&bytes).to_hex().as_str() != mhash {
        return Err(Error::Remote(format!(
            "manifest {mhash} does not match its hash (damaged upstream?)"
        )));
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut json)
        .map_err(|e| Error::Remote(format!("manifest {mhash}: {e}")))?;
    let m: Manifest = serde_json::from_slice(&json)
        .map_err(|e| Error::Remote(format!("manifest {mhash}: {e}")))?;
    validate(&m).map_err(|e| Error::Remote(format!("manifest {mhash}: {e}")))?;
    Ok((mhash, m))
}

fn valid_tag(tag: &str) -> Result<()> {
    if tag.is_empty()
        || tag.len() > 128
        || !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || tag.starts_with('.')
    {
        return Err(Error::Invalid(
            "tags are 1-128 characters of letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// The compressed manifest and its name (BLAKE3 of the compressed bytes).
fn encode(m: &Manifest) -> Result<(String, Vec<u8>)> {
    let json =
        serde_json::to_vec(m).map_err(|e| Error::Remote(format!("encoding the manifest: {e}")))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&json)
        .map_err(|e| Error::Remote(format!("compressing the manifest: {e}")))?;
    let bytes = gz
        .finish()
        .map_err(|e| Error::Remote(format!("compressing the manifest: {e}")))?;
    Ok((blake3::hash(&bytes).to_hex().to_string(), bytes))
}

impl Store {
    /// A snapshot of volume `volume` now, encoded as a manifest: (hash, bytes).
    pub fn snapshot_bytes(&self, volume: &str) -> Result<(String, Vec<u8>)> {
        encode(&self.snapshot(volume)?)
    }

    fn snapshot(&self, volume: &str) -> Result<Manifest> {
        let v = self.volume(volume, false, 0, 0)?;
        let conn = self.conn();
        // One read transaction: a consistent view even while the volume is in use.
        let tx = self.begin_tx(&conn)?;
        let inodes: Vec<MInode> = {
            let mut stmt = tx.prepare(
                "SELECT ino, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, rdev, blob, target
                 FROM inodes WHERE volume = ?1 AND nlink > 0",
            )?;
            let rows = stmt.query_map([v.id], |r| {
                Ok(MInode {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    mode: r.get(2)?,
                    uid: r.get(3)?,
                    gid: r.get(4)?,
                    size: r.get(5)?,
                    atime: r.get(6)?,
                    mtime: r.get(7)?,
                    ctime: r.get(8)?,
                    nlink: r.get(9)?,
                    rdev: r.get(10)?,
                    blob: r.get::<_, Option<Hash>>(11)?.map(|h| h.to_hex()),
                    target: r.get(12)?,
                })
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let dirents: Vec<(i64, Vec<u8>, i64)> = {
            let mut stmt = tx.prepare(
                "SELECT d.parent, d.name, d.ino FROM dirents d JOIN inodes i ON i.ino = d.ino
                 WHERE i.volume = ?1 ORDER BY d.id",
            )?;
            let rows = stmt.query_map([v.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let xattrs: Vec<(i64, Vec<u8>, Vec<u8>)> = {
            let mut stmt = tx.prepare(
                "SELECT x.ino, x.name, x.value FROM xattrs x JOIN inodes i ON i.ino = x.ino
                 WHERE i.volume = ?1",
            )?;
            let rows = stmt.query_map([v.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let blobs: Vec<(String, u64)> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT b.hash, b.size FROM blobs b JOIN inodes i ON i.blob = b.hash
                 WHERE i.volume = ?1 AND i.nlink > 0",
            )?;
            // Every row or none: a manifest missing a size would make its pullers fail, or
            // worse, guess.
            let rows = stmt.query_map([v.id], |r| {
                Ok((
                    r.get::<_, Hash>(0)?.to_hex(),
                    crate::codec::unsigned(r.get(1)?, "blobs.size")?,
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        self.commit_tx(tx)?;
        Ok(Manifest {
            version: MANIFEST_VERSION,
            volume: volume.to_owned(),
            created: now_ns(),
            root: v.root as i64,
            blobs,
            inodes,
            dirents,
            xattrs,
        })
    }

    /// Uploads local blob `h` (`size` bytes) to `up`: its outboard first when `outboard`
    /// (a reader that finds the blob then finds the outboard too, so it can read the blob
    /// while it downloads), then the bytes when `blob`.
    pub(crate) fn upload_blob(
        &self,
        up: &Upstream,
        h: &Hash,
        size: u64,
        blob: bool,
        outboard: bool,
    ) -> Result<()> {
        if outboard {
            // The blob file itself is the source: checked (size, inode) like any read.
            let mut f = self.blobs().open_blob(h)?;
            let ob = outboard::compute(&mut f, size)
                .map_err(|e| Error::Remote(format!("computing the outboard of {h}: {e}")))?;
            Store::put_object(up, &outboard_key(h), None, &ob)?;
        }
        if blob {
            drop(self.blobs().open_blob(h)?);
            Store::put_object(up, &blob_key(h), Some(&self.blobs().blob_path(h)), &[])?;
        }
        Ok(())
    }

    /// Uploads volume `volume` to `up` under `tag`, adding to what the tag holds (see
    /// `push_with`). Only blobs the upstream lacks are sent.
    pub fn push(
        &self,
        up: &Upstream,
        volume: &str,
        tag: &str,
        sign: Option<&str>,
        progress: &mut dyn FnMut(&PushProgress),
    ) -> Result<PushReport> {
        self.push_with(up, volume, tag, sign, false, progress)
    }

    /// Uploads volume `volume` to `up` under `tag`. Additive unless `replace`: the tag then
    /// names the union of what it named and this volume (this volume's names win; names only
    /// the tag had stay; see `union`), and the tag moves only if no other push moved it in
    /// between (else the union is made again), so pushes racing to one tag never lose each
    /// other's files. With `replace` the tag names exactly this volume.
    pub fn push_with(
        &self,
        up: &Upstream,
        volume: &str,
        tag: &str,
        sign: Option<&str>,
        replace: bool,
        progress: &mut dyn FnMut(&PushProgress),
    ) -> Result<PushReport> {
        valid_tag(tag)?;
        let m = self.snapshot(volume)?;
        let mut report = PushReport {
            tag: tag.to_owned(),
            ..Default::default()
        };
        // One listing per kind instead of one existence check per blob.
        let have_blobs = Store::list_objects(up, "blobs/")?;
        let have_outboards = Store::list_objects(up, "outboards/")?;
        let mut todo = Vec::new();
        let mut pushed = Vec::new();
        for (hex, size) in &m.blobs {
            let h = Hash::from_hex(hex).ok_or(Error::Invalid("bad hash in snapshot"))?;
            let key = blob_key(&h);
            let ob_missing = outboard::needed(*size) && !have_outboards.contains(&outboard_key(&h));
            if have_blobs.contains(&key) && !ob_missing {
                report.blobs_present += 1;
            } else {
                todo.push((h, *size, !have_blobs.contains(&key), ob_missing));
            }
            pushed.push(h);
        }
        let mut prog = PushProgress {
            blobs_total: todo.len() as u64,
            bytes_total: todo.iter().filter(|t| t.2).map(|t| t.1).sum(),
            ..Default::default()
        };
        progress(&prog);
        for (h, size, blob_missing, ob_missing) in todo {
            self.upload_blob(up, &h, size, blob_missing, ob_missing)?;
            if blob_missing {
                report.blobs_uploaded += 1;
                report.bytes_uploaded += size;
                prog.bytes_done += size;
            } else {
                report.blobs_present += 1;
            }
            prog.blobs_done += 1;
            progress(&prog);
        }
        // What the tag names now is merged in under the same trust a pull would give it:
        // a store that trusts keys merges only a manifest one of them signed.
        let trusted = self.trusted_keys()?;
        let from_up = Remote::new(vec![up.clone()], Default::default())?;
        let mut published = String::new();
        let mut merged_with = None;
        up.update_tag(tag, &mut |current| {
            let (merged, base) = match current {
                Some(pointer) if !replace => {
                    let (bhash, base) =
                        read_pointed(&from_up, tag, pointer, &trusted).map_err(|e| {
                            Error::Remote(format!(
                                "{e} (to publish this volume alone, push with --replace)"
                            ))
                        })?;
                    (crate::union::union(&base, &m), Some(bhash))
                }
                _ => (m.clone(), None),
            };
            validate(&merged)
                .map_err(|e| Error::Remote(format!("the merged snapshot is inconsistent: {e}")))?;
            let (mhash, bytes) = encode(&merged)?;
            // Blobs and the manifest first, the tag last: a reader following the tag finds
            // everything it names.
            Store::put_object(up, &format!("manifests/{mhash}"), None, &bytes)?;
            let mut pointer = format!("{mhash}\n");
            if let Some(secret) = sign {
                let seed = from_hex::<32>(secret)
                    .ok_or(Error::Invalid("a secret key is 64 hex digits"))?;
                let key = ed25519_dalek::SigningKey::from_bytes(&seed);
                let sig = ed25519_dalek::Signer::sign(&key, &signed_message(&mhash));
                pointer.push_str(&format!(
                    "sig ed25519 {} {}\n",
                    to_hex(key.verifying_key().as_bytes()),
                    to_hex(&sig.to_bytes())
                ));
            }
            published = mhash;
            merged_with = base;
            Ok(pointer.into_bytes())
        })?;
        self.mark_remote(&pushed)?;
        report.manifest = published;
        report.merged_with = merged_with;
        Ok(report)
    }

    /// Makes volume `volume` the snapshot tagged `tag` on the upstreams (replacing what the
    /// volume held), metadata only. The volume must not be mounted (the caller checks).
    pub fn pull(
        &self,
        remote: &Remote,
        tag: &str,
        volume: &str,
        trusted: &[String],
    ) -> Result<PullReport> {
        Ok(self
            .pull_with(remote, tag, volume, trusted, PullMode::Replace)?
            .report)
    }

    /// Pulls the snapshot tagged `tag` into volume `volume` by `mode` (see `PullMode`). The
    /// whole manifest is read and checked first; then the volume changes in one transaction,
    /// whichever the mode, so a bad manifest leaves it as it was. A merge returns the names it
    /// changed: the caller tells the kernel, and purges each replaced inode left without
    /// names once nothing holds it (as after an unlink).
    pub fn pull_with(
        &self,
        remote: &Remote,
        tag: &str,
        volume: &str,
        trusted: &[String],
        mode: PullMode,
    ) -> Result<Pulled> {
        self.pull_with_hook(remote, tag, volume, trusted, mode, &mut |_| {})
    }

    /// `pull_with`, calling `before_commit` with a merge's changes inside its transaction,
    /// just before the commit (the filesystem marks the inodes it will have to keep).
    pub fn pull_with_hook(
        &self,
        remote: &Remote,
        tag: &str,
        volume: &str,
        trusted: &[String],
        mode: PullMode,
        before_commit: &mut dyn FnMut(&[NameChange]),
    ) -> Result<Pulled> {
        let (mhash, m) = self.fetch_manifest(remote, tag, trusted)?;
        match mode {
            PullMode::Replace => Ok(Pulled {
                report: self.install_manifest(&m, volume, &mhash, "replace")?,
                changed: Vec::new(),
            }),
            PullMode::Merge { theirs } => {
                self.merge_manifest(&m, volume, &mhash, theirs, before_commit)
            }
        }
    }

    /// The manifest hash tag `tag` names now on `remote` (unchecked: a change detector for
    /// `follow=`, which then pulls, and checks, as any pull does).
    pub fn tag_manifest(&self, remote: &Remote, tag: &str) -> Result<String> {
        valid_tag(tag)?;
        let pointer = Store::get_object(remote, &format!("tags/{tag}"))?;
        Ok(String::from_utf8_lossy(&pointer)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned())
    }

    /// The manifest tag `tag` names, checked whole: signature, hash, format, consistency.
    fn fetch_manifest(
        &self,
        remote: &Remote,
        tag: &str,
        trusted: &[String],
    ) -> Result<(String, Manifest)> {
        valid_tag(tag)?;
        let pointer = Store::get_object(remote, &format!("tags/{tag}"))?;
        read_pointed(remote, tag, &pointer, trusted)
    }

    /// Installs a validated manifest as volume `volume`, replacing the volume of that name if
    /// there is one, in one transaction. The new tree takes its references before the old
    /// one drops its own, so content both use is never deleted on the way.
    pub(crate) fn install_manifest(
        &self,
        m: &Manifest,
        volume: &str,
        mhash: &str,
        mode: &str,
    ) -> Result<PullReport> {
        let conn = self.conn();
        let tx = self.begin_tx(&conn)?;
        let old: Option<i64> = tx
            .query_row("SELECT id FROM volumes WHERE name = ?1", [volume], |r| {
                r.get(0)
            })
            .optional()?;
        // Volume names never hold NUL: the new tree is built under a name no one can use,
        // and renamed once the old one is gone.
        let building = format!("{volume}\0pull");
        let (vid, first) =
            crate::volumes::new_volume_row(&tx, if old.is_some() { &building } else { volume })?;
        let mut ids: HashMap<i64, i64> = HashMap::new();
        for (i, n) in m.inodes.iter().enumerate() {
            ids.insert(n.id, first + i as i64);
        }
        let map = |id: i64| -> Result<i64> {
            ids.get(&id)
                .copied()
                .ok_or_else(|| Error::Remote(format!("manifest names unknown inode {id}")))
        };
        let mut refs: HashMap<String, i64> = HashMap::new();
        let mut files = 0;
        {
            let mut ins = tx.prepare(
                "INSERT INTO inodes (ino, volume, kind, mode, uid, gid, size, atime, mtime, ctime,
                                     nlink, rdev, parent, blob, target)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, ?13, ?14)",
            )?;
            for n in &m.inodes {
                let blob = match &n.blob {
                    Some(hex) => {
                        let h = Hash::from_hex(hex)
                            .ok_or_else(|| Error::Remote(format!("bad blob hash {hex}")))?;
                        *refs.entry(hex.clone()).or_default() += 1;
                        Some(h.0.to_vec())
                    }
                    None => None,
                };
                if n.kind == 1 {
                    files += 1;
                }
                ins.execute(params![
                    map(n.id)?,
                    vid,
                    n.kind,
                    n.mode,
                    n.uid,
                    n.gid,
                    n.size,
                    n.atime,
                    n.mtime,
                    n.ctime,
                    n.nlink,
                    n.rdev,
                    blob,
                    n.target
                ])?;
            }
            let mut dir =
                tx.prepare("INSERT INTO dirents (parent, name, ino) VALUES (?1, ?2, ?3)")?;
            let mut parent =
                tx.prepare("UPDATE inodes SET parent = ?2 WHERE ino = ?1 AND kind = 2")?;
            for (p, name, ino) in &m.dirents {
                dir.execute(params![map(*p)?, name, map(*ino)?])?;
                parent.execute(params![map(*ino)?, map(*p)?])?;
            }
            let mut x = tx.prepare("INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)")?;
            for (ino, name, value) in &m.xattrs {
                x.execute(params![map(*ino)?, name, value])?;
            }
        }
        let sizes: HashMap<&String, u64> = m.blobs.iter().map(|(h, s)| (h, *s)).collect();
        let mut remote_only = 0;
        {
            for (hex, n) in &refs {
                let size = *sizes.get(hex).ok_or_else(|| {
                    Error::Remote(format!("manifest lacks the size of blob {hex}"))
                })?;
                let h = Hash::from_hex(hex).expect("checked above");
                if crate::lifecycle::pull_ref(&tx, &h, size, *n)? == crate::BlobState::RemoteOnly {
                    remote_only += 1;
                }
            }
        }
        let root = map(m.root)?;
        tx.execute(
            "UPDATE volumes SET root = ?2 WHERE id = ?1",
            params![vid, root],
        )?;
        let mut dead = Vec::new();
        let mut removed = 0;
        if let Some(old) = old {
            (removed, dead) = crate::volumes::delete_volume_rows(&tx, old)?;
            tx.execute(
                "UPDATE volumes SET name = ?2 WHERE id = ?1",
                params![vid, volume],
            )?;
        }
        crate::volumes::bump_inode_sequence(&tx)?;
        self.commit_tx(tx)?;
        self.blobs().remove_dead_blobs(&conn, &dead);
        Ok(PullReport {
            manifest: mhash.to_owned(),
            files,
            blobs: refs.len() as u64,
            blobs_remote: remote_only,
            mode: mode.to_owned(),
            added: m.dirents.len() as u64,
            removed,
            ..Default::default()
        })
    }
}
