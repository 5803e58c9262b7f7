//! Boot and container integration: mount(8) with the mount.kcache helper and fstab, in a
//! private mount namespace so the host's /sbin and mount table are left alone.

use std::process::Command;

use kcache_tests::{fuse_available, kcache_bin};

/// Runs a bash script in a new private mount namespace; returns (exit code, output).
fn in_mount_namespace(script: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "bash",
            "-c",
            script,
            "boot-test",
        ])
        .args(args)
        .output()
        .expect("running unshare");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn mount_t_kcache_and_fstab_with_mount_a() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // /usr/sbin gets a private overlay so that `kcache install` can add mount.kcache to the
    // directory mount(8) searches without touching the host.
    let script = r#"
set -eu
K=$1; T=$2
mkdir -p $T/u $T/w $T/mp1 $T/mp2 $T/mp3
sbin=$(readlink -f /sbin)
mount -t overlay overlay -o lowerdir=$sbin,upperdir=$T/u,workdir=$T/w $sbin
$K install --dir $sbin
mount -t kcache -o quota=64M,volume=v1,allow_other,uid=1000,umask=022 $T/store $T/mp1
grep -q " $T/mp1 .* - fuse.kcache $T/store " /proc/self/mountinfo && echo "MOUNTED-BY-HELPER"
echo hello > $T/mp1/x
stat -c 'ROOT %u %a' $T/mp1
# Plain umount(8) ends the daemon: it lets go of the store's lock.
umount $T/mp1
for i in $(seq 200); do flock -n $T/store/lock true && break; sleep 0.05; done
flock -n $T/store/lock true && echo "DAEMON-ENDED"
printf '%s\n' "$T/store $T/mp2 kcache quota=20G,allow_other,_netdev,nofail,volume=v1,x-systemd.automount 0 0" > $T/fstab
mount -a -T $T/fstab
echo "FSTAB-READ $(cat $T/mp2/x)"
echo committed > $T/mp2/y
for i in $(seq 200); do [ -z "$(ls $T/store/staging)" ] && break; sleep 0.05; done
# Past the group-commit bound (ARCHITECTURE.md, crash contract): the commit is on disk.
sleep 0.2
# The daemon dies by SIGKILL: the mount is dead; unmounting it and mount -a bring it back.
pkill -KILL -f "kcache mount --foreground .*$T/mp2" && echo "KILLED"
for i in $(seq 200); do flock -n $T/store/lock true && break; sleep 0.05; done
cat $T/mp2/y 2>/dev/null || echo "DEAD-MOUNT"
umount $T/mp2
mount -a -T $T/fstab
echo "AFTER-RESTART $(cat $T/mp2/x) $(cat $T/mp2/y)"
set +e
mount -t kcache -o bogus=1 $T/store2 $T/mp3
echo "BAD-OPTION-EXIT $?"
# A second volume of the same store: served by the same daemon, isolated from the first.
mount -t kcache -o volume=v2 $T/store $T/mp3 && echo "SECOND-VOLUME-MOUNTED"
test -e $T/mp3/x || echo "V2-ISOLATED"
umount $T/mp3
mount -f -t kcache -o quota=1G $T/store2 $T/mp3
echo "FAKE-EXIT $? $(test -e $T/store2 && echo created || echo untouched)"
$K umount $T/mp2 && echo "KCACHE-UMOUNT-OK"
"#;
    let (code, out) = in_mount_namespace(
        script,
        &[kcache_bin().to_str().unwrap(), dir.path().to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    for want in [
        "MOUNTED-BY-HELPER",
        "ROOT 1000 755",
        "DAEMON-ENDED",
        "FSTAB-READ hello",
        "KILLED",
        "DEAD-MOUNT",
        "AFTER-RESTART hello committed",
        "BAD-OPTION-EXIT 32",
        "unknown mount option 'bogus=1'",
        "SECOND-VOLUME-MOUNTED",
        "V2-ISOLATED",
        "FAKE-EXIT 0 untouched",
        "KCACHE-UMOUNT-OK",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn systemd_units_verify_and_the_daemon_speaks_sd_notify() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    // The shipped units, with the binary path of this build.
    let units = kcache_tests::workspace().join("systemd");
    let service = std::fs::read_to_string(units.join("kcache@.service"))
        .unwrap()
        .replace("/usr/bin/kcache", kcache_bin().to_str().unwrap());
    std::fs::write(dir.path().join("kcache@var-cache-kcache.service"), service).unwrap();
    std::fs::copy(
        units.join("var-cache-kcache.mount"),
        dir.path().join("var-cache-kcache.mount"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "kcache@var-cache-kcache.service",
            "var-cache-kcache.mount",
        ])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (apt install systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    if !fuse_available() {
        return;
    }
    // Type=notify: READY=1 only once the mount answers, STOPPING=1 on SIGTERM.
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(kcache_bin())
        .args(["mount", "--foreground", "--store"])
        .arg(dir.path().join("store"))
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no READY=1 from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means the mount answers now.
    std::fs::write(mnt.join("f"), b"x").unwrap();
    let fstype = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(mnt.to_str().unwrap()) && l.contains("fuse.kcache"));
    assert!(fstype, "not mounted when READY=1 came");
    // SAFETY: kill with a valid pid of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("no STOPPING=1 from the daemon");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
}

/// `umount MNT && mount MNT`, typed as an operator types it: the new mount (or command) finds
/// the old daemon still letting go of the store, and waits for it instead of failing.
#[test]
fn umount_then_mount_again_fifty_times_through_mount8_kcache_mount_and_a_command_between() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
set -u
K=$1; T=$2
mkdir -p $T/u $T/w $T/mp
sbin=$(readlink -f /sbin)
mount -t overlay overlay -o lowerdir=$sbin,upperdir=$T/u,workdir=$T/w $sbin || exit 9
$K install --dir $sbin || exit 9
mount -t kcache $T/store $T/mp || exit 9
fail=0
for i in $(seq 50); do
    echo "m8-$i" > $T/mp/n
    umount $T/mp && mount -t kcache $T/store $T/mp || { echo "MOUNT8-FAILED $i"; fail=1; }
    [ "$(cat $T/mp/n)" = "m8-$i" ] || { echo "MOUNT8-CONTENT $i"; fail=1; }
done
for i in $(seq 50); do
    echo "km-$i" > $T/mp/n
    umount $T/mp && $K mount --store $T/store $T/mp || { echo "KMOUNT-FAILED $i"; fail=1; }
    [ "$(cat $T/mp/n)" = "km-$i" ] || { echo "KMOUNT-CONTENT $i"; fail=1; }
done
for i in $(seq 50); do
    echo "cmd-$i" > $T/mp/n
    # A command that opens the store itself (gc), and one that reads it (stats), each right
    # after the unmount, then the mount right after them.
    umount $T/mp && $K gc --store $T/store >/dev/null && $K stats --store $T/store >/dev/null \
        && mount -t kcache $T/store $T/mp || { echo "CMD-FAILED $i"; fail=1; }
    [ "$(cat $T/mp/n)" = "cmd-$i" ] || { echo "CMD-CONTENT $i"; fail=1; }
done
echo "LOOPS-FAILED=$fail"
umount $T/mp
# Something holds the store without serving it (as a daemon does while it starts or
# leaves): a mount waits for it to let go, and within the bound it succeeds.
flock $T/store/lock sleep 1.5 &
sleep 0.3
mount -t kcache $T/store $T/mp && [ "$(cat $T/mp/n)" = "cmd-50" ] && echo "WAITED-AND-MOUNTED"
wait
umount $T/mp
# Past the bound: a clear refusal naming what it waited for.
flock $T/store/lock sleep 4 &
sleep 0.3
KCACHE_SETTLE_TIMEOUT=1 mount -t kcache $T/store $T/mp
echo "BOUND-EXIT $?"
KCACHE_SETTLE_TIMEOUT=1 $K gc --store $T/store
echo "GC-BOUND-EXIT $?"
wait
$K verify --store $T/store | tail -1
"#;
    let (code, out) = in_mount_namespace(
        script,
        &[kcache_bin().to_str().unwrap(), dir.path().to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    for want in [
        "LOOPS-FAILED=0",
        "WAITED-AND-MOUNTED",
        "BOUND-EXIT 32",
        "is held by a kcache daemon that is starting or leaving and has not finished after 1 s",
        "GC-BOUND-EXIT 1",
        "store is clean",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}
