//! The Debian package: built by cargo-deb from this build's binary, installed with dpkg,
//! mounted by mount(8) from an /etc/fstab line through /sbin/mount.kcache, then removed and
//! purged, after which the store and its content must still be there.
//!
//! dpkg and mount(8) run in a private mount namespace with overlays over /usr, /etc and
//! /var/lib/dpkg, so the host's files, package database and fstab are never changed: whatever
//! was at /usr/bin/kcache or /sbin/mount.kcache before is there after, even when the test is
//! killed half way (the overlays end with the namespace).

use std::path::Path;
use std::process::Command;

use kcache_tests::{fuse_available, kcache_bin, workspace};

/// Whether `cmd args` runs and succeeds.
fn works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The cargo that runs this test (its `deb` subcommand is cargo-deb).
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// False (skip) when a tool is missing; with REQUIRE_FUSE (CI) that is a failure instead.
fn tools_available() -> bool {
    let cargo = cargo();
    let missing: Vec<&str> = [
        (
            "cargo-deb (cargo install cargo-deb --locked)",
            &cargo[..],
            &["deb", "--version"][..],
        ),
        ("dpkg", "dpkg", &["--version"][..]),
        // cargo-deb works out the libc dependency with it.
        (
            "dpkg-shlibdeps (apt install dpkg-dev)",
            "dpkg-shlibdeps",
            &["--version"][..],
        ),
        ("unshare", "unshare", &["--version"][..]),
        ("flock", "flock", &["--version"][..]),
        ("systemd-analyze", "systemd-analyze", &["--version"][..]),
    ]
    .into_iter()
    .filter(|(_, cmd, args)| !works(cmd, args))
    .map(|(name, _, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("REQUIRE_FUSE").is_none(),
        "REQUIRE_FUSE is set but the package test lacks: {}",
        missing.join(", ")
    );
    eprintln!("skipping: missing {}", missing.join(", "));
    false
}

/// Builds the .deb at `out` with `cargo deb --no-build`. cargo-deb packages
/// `<target>/release/kcache`; a target directory of its own holding this build's binary there
/// spares CI a release build (cargo-deb refuses dev-profile paths).
fn build_deb(dir: &Path, out: &Path) {
    let release = dir.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    let bin = release.join("kcache");
    if std::fs::hard_link(kcache_bin(), &bin).is_err() {
        std::fs::copy(kcache_bin(), &bin).unwrap();
    }
    let o = Command::new(cargo())
        .args([
            "deb",
            "-p",
            "kcache-mountd",
            "--no-build",
            "--strip",
            "--fast",
        ])
        .arg("--output")
        .arg(out)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(
        o.status.success() && out.exists(),
        "cargo deb: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

const SCRIPT: &str = r#"
set -eu
DEB=$1 T=$2 K=$3
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
# Whatever happens below, no daemon outlives the script (its namespace would linger).
cleanup() {
    for m in $T/mnt; do
        mountpoint -q $m && { umount $m || umount -l $m; }
    done
    for i in $(seq 200); do flock -n $T/store/lock true 2>/dev/null && break; sleep 0.05; done
}
trap cleanup EXIT
for d in /usr /etc /var/lib/dpkg; do
    o=$T/overlay$(echo $d | tr / _)
    mkdir -p $o/u $o/w
    mount -t overlay overlay -o lowerdir=$d,upperdir=$o/u,workdir=$o/w $d
done
dpkg --log=/dev/null -i $DEB
echo "STATUS $(dpkg-query -W -f '${Status}' kcache)"
echo "DEPENDS $(dpkg-query -W -f '${Depends}' kcache)"
for f in /usr/bin/kcache /usr/lib/systemd/system/kcache@.service \
    /usr/lib/systemd/system/var-cache-kcache.mount /usr/share/doc/kcache/README.md \
    /usr/share/doc/kcache/ARCHITECTURE.md /usr/share/doc/kcache/systemd/README.md \
    /usr/share/doc/kcache/docs/commit-protocol.md /usr/share/doc/kcache/dashboards/kcache.json; do
    test -f $f && echo "INSTALLED $f"
done
echo "HELPER $(readlink /sbin/mount.kcache)"
dpkg -L kcache | grep -q '^/var' && echo "OWNS-VAR"
# The installed units, with the installed binary path (verify checks ExecStart= exists).
mkdir $T/units
ln -s /usr/lib/systemd/system/kcache@.service $T/units/kcache@var-cache-kcache.service
(cd $T/units && systemd-analyze verify kcache@var-cache-kcache.service \
    /usr/lib/systemd/system/var-cache-kcache.mount 2>&1) && echo "UNITS-VERIFIED"

# A real fstab line, mounted by its mountpoint the way boot does: mount(8) -> mount.kcache.
mkdir -p $T/mnt
echo "$T/store $T/mnt kcache quota=64M,allow_other,_netdev,nofail 0 0" >> /etc/fstab
mount $T/mnt
grep -q " $T/mnt .* - fuse.kcache $T/store " /proc/self/mountinfo && echo "MOUNTED"
echo hello > $T/mnt/greeting
echo "READ $(cat $T/mnt/greeting)"
umount $T/mnt
for i in $(seq 200); do flock -n $T/store/lock true && break; sleep 0.05; done
sed -i "\# $T/mnt #d" /etc/fstab
grep -q " $T/mnt " /etc/fstab || echo "FSTAB-LINE-REMOVED"

dpkg --log=/dev/null -r kcache
test -e /usr/bin/kcache || test -L /sbin/mount.kcache || echo "REMOVED"
dpkg --log=/dev/null --purge kcache
dpkg-query -W kcache >/dev/null 2>&1 || echo "PURGED"
test -f $T/store/kcache.db && echo "STORE-KEPT"
# And its content: this build's binary mounts the store again and reads the file back.
$K mount --store $T/store $T/mnt
echo "AFTER-PURGE $(cat $T/mnt/greeting)"
$K umount $T/mnt
"#;

#[test]
fn deb_installs_mounts_from_fstab_and_removing_it_leaves_the_store() {
    if !fuse_available() || !tools_available() {
        return;
    }
    // Dropped last on every path, a panic included: the overlays' upper layers, the store.
    let dir = tempfile::Builder::new()
        .prefix("kcache-package")
        .tempdir()
        .unwrap();
    let deb = dir.path().join("kcache.deb");
    build_deb(dir.path(), &deb);
    let out = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "bash",
            "-c",
            SCRIPT,
            "package-test",
        ])
        .arg(&deb)
        .arg(dir.path())
        .arg(kcache_bin())
        .output()
        .expect("running unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The transcript shows with --nocapture.
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    let t = dir.path().display();
    for want in [
        "STATUS install ok installed",
        "DEPENDS fuse3",
        "INSTALLED /usr/bin/kcache",
        "INSTALLED /usr/lib/systemd/system/kcache@.service",
        "INSTALLED /usr/lib/systemd/system/var-cache-kcache.mount",
        "INSTALLED /usr/share/doc/kcache/README.md",
        "INSTALLED /usr/share/doc/kcache/ARCHITECTURE.md",
        "INSTALLED /usr/share/doc/kcache/systemd/README.md",
        "INSTALLED /usr/share/doc/kcache/docs/commit-protocol.md",
        "INSTALLED /usr/share/doc/kcache/dashboards/kcache.json",
        "HELPER /usr/bin/kcache",
        "UNITS-VERIFIED",
        "MOUNTED",
        "READ hello",
        "FSTAB-LINE-REMOVED",
        "REMOVED",
        "PURGED",
        "STORE-KEPT",
        "AFTER-PURGE hello",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        !text.contains("OWNS-VAR"),
        "the package owns files in /var:\n{text}"
    );
    // Nothing of it reached the host (the overlays took every change).
    let fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
    assert!(!fstab.contains(&format!("{t}/mnt")), "{fstab}");
}
