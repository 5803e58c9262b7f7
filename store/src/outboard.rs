//! Outboards: the BLAKE3 chaining values of a blob's 1 MiB groups, which let any group be
//! verified against the blob's hash on its own, before the rest of the blob has arrived.
//!
//! BLAKE3 is a Merkle tree whose left subtrees are always powers of two of its 1 KiB chunks,
//! so aligned power-of-two groups of chunks are subtrees of every blob's tree (the blake3
//! `hazmat` docs state this). An outboard is the list of the groups' chaining values; merging
//! them up the tree must give the blob's hash, so one check of the whole list against the hash
//! authenticates every entry, and after that a group's bytes are correct exactly when they hash
//! to their entry. This is what lets a large file be read while it downloads, or read far ahead
//! of the download with a ranged request, without ever serving unverified bytes.
//!
//! Blobs of one group or less need no outboard: their hash verifies them directly.

use std::io::Read;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::Hash;

/// Bytes per group: the unit of verification, of ranged fetches and of waiting readers.
pub const GROUP: u64 = 1 << 20;

/// How many groups a blob of `size` bytes has (at least one).
pub fn groups(size: u64) -> u64 {
    size.div_ceil(GROUP).max(1)
}

/// The byte range of group `g` of a blob of `size` bytes.
pub fn group_range(size: u64, g: u64) -> (u64, u64) {
    let start = g * GROUP;
    (start, (start + GROUP).min(size))
}

/// Whether a blob of `size` bytes has an outboard (more than one group).
pub fn needed(size: u64) -> bool {
    size > GROUP
}

/// The chaining value of group `g` with content `data` (in a blob of more than one group).
pub fn group_cv(g: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(g * GROUP);
    h.update(data);
    h.finalize_non_root()
}

/// The outboard of a blob read from `r` (`size` bytes): 32 bytes per group, in order.
pub fn compute(r: &mut dyn Read, size: u64) -> std::io::Result<Vec<u8>> {
    let n = groups(size);
    let mut out = Vec::with_capacity(n as usize * 32);
    let mut buf = vec![0u8; GROUP as usize];
    for g in 0..n {
        let (start, end) = group_range(size, g);
        let len = (end - start) as usize;
        r.read_exact(&mut buf[..len])?;
        out.extend_from_slice(&group_cv(g, &buf[..len]));
    }
    Ok(out)
}

/// The chaining value of the subtree of `len` bytes starting at byte `offset`, from the
/// groups' values. `offset` is a multiple of GROUP, and so (by BLAKE3's splitting rule) is
/// every left subtree length of a subtree longer than one group.
fn subtree(cvs: &[ChainingValue], offset: u64, len: u64) -> ChainingValue {
    if len <= GROUP {
        return cvs[(offset / GROUP) as usize];
    }
    let left = left_subtree_len(len);
    merge_subtrees_non_root(
        &subtree(cvs, offset, left),
        &subtree(cvs, offset + left, len - left),
        Mode::Hash,
    )
}

/// The blob hash the groups' values add up to.
fn root(cvs: &[ChainingValue], size: u64) -> Hash {
    let left = left_subtree_len(size);
    let h = merge_subtrees_root(
        &subtree(cvs, 0, left),
        &subtree(cvs, left, size - left),
        Mode::Hash,
    );
    Hash(*h.as_bytes())
}

/// Parses an outboard fetched for blob `hash` of `size` bytes; `Err` says why it cannot be
/// trusted (wrong length, or its values do not add up to the hash).
pub fn parse_verified(bytes: &[u8], hash: &Hash, size: u64) -> Result<Vec<ChainingValue>, String> {
    if !needed(size) {
        return Err(format!("a blob of {size} bytes has no outboard"));
    }
    let n = groups(size) as usize;
    if bytes.len() != n * 32 {
        return Err(format!(
            "outboard has {} bytes, a blob of {size} bytes needs {}",
            bytes.len(),
            n * 32
        ));
    }
    let cvs: Vec<ChainingValue> = bytes
        .chunks_exact(32)
        .map(|c| c.try_into().expect("chunks of 32"))
        .collect();
    let got = root(&cvs, size);
    if got != *hash {
        return Err(format!("outboard adds up to {got}, not {hash}"));
    }
    Ok(cvs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn outboards_add_up_to_the_blake3_hash_for_every_shape() {
        let g = GROUP as usize;
        for len in [
            g + 1,
            2 * g,
            2 * g + 1,
            3 * g - 1,
            3 * g,
            4 * g + 1024,
            5 * g + 7,
            7 * g,
            8 * g,
            9 * g + 3,
        ] {
            let d = data(len);
            let hash = Hash(*blake3::hash(&d).as_bytes());
            let ob = compute(&mut &d[..], len as u64).unwrap();
            let cvs = parse_verified(&ob, &hash, len as u64)
                .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
            for (i, cv) in cvs.iter().enumerate() {
                let (s, e) = group_range(len as u64, i as u64);
                assert_eq!(group_cv(i as u64, &d[s as usize..e as usize]), *cv);
            }
            // One flipped byte in any group changes that group's value.
            let mut bad = d.clone();
            bad[len - 1] ^= 1;
            let last = groups(len as u64) - 1;
            let (s, _) = group_range(len as u64, last);
            assert_ne!(group_cv(last, &bad[s as usize..]), cvs[last as usize]);
        }
    }

    #[test]
    fn tampered_or_misfit_outboards_are_refused() {
        let len = 3 * GROUP as usize + 5;
        let d = data(len);
        let hash = Hash(*blake3::hash(&d).as_bytes());
        let mut ob = compute(&mut &d[..], len as u64).unwrap();
        assert!(parse_verified(&ob[..32 * 3], &hash, len as u64)
            .unwrap_err()
            .contains("needs 128"));
        ob[40] ^= 1;
        assert!(parse_verified(&ob, &hash, len as u64)
            .unwrap_err()
            .contains("adds up to"));
        assert!(parse_verified(&[], &hash, 100).is_err());
    }
}
