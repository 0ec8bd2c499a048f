#!/usr/bin/env bash
# CI job: the daemon on emulated aarch64 (Raspberry Pi 4 and 5) under QEMU user-mode emulation.
#
#   sudo bash .ci/aarch64.sh          (root: binfmt_misc, mmdebstrap and chroot need it)
#
# 1. tools: Debian's qemu-user-static, binfmt-support, mmdebstrap (apt-get when missing);
#    binfmt_misc mounted and qemu-aarch64 enabled;
# 2. an arm64 Debian bookworm root (mmdebstrap minbase + python3, ~2-5 min), cached under
#    $EOEDGE_CI_CACHE (/var/cache/eoedge-ci) by a hash of the command;
# 3. the daemon's aarch64 dependency wheels, fetched on the host (pip --target --platform
#    manylinux_*_aarch64: pip inside the emulated root would be slow and lacks the host's CA
#    files; without the manylinux_2_31+ tags pip falls back to openvino 2023.1), cached by a hash
#    of the requirements; the daemon itself from a wheel built here (`pip wheel . --no-deps`);
# 4. bundles the ground builds on this host for rpi4 (fp32) and rpi5 (fp16) (.ci/bundles.sh);
# 5. in the root (/proc, /sys, /dev bound: without /proc `ov.Core()` hangs, without /sys hwloc
#    aborts), under QEMU_CPU=cortex-a72 (Pi 4: no FP16 arithmetic, f32) and cortex-a76 (Pi 5:
#    f16): .ci/flight_test.py (torch absent; a real daemon process with CURVE keys; a bundle
#    uplinked, installed and self-tested at the profile's tolerance; a frame through the bus; v2
#    then a rollback) and .ci/refdiff.py (max |p - p_host_f32| at f32 and f16).
# A step that cannot run here says so in one line (SKIP) and the job ends without failing.
# Timings under emulation mean nothing.
JOB=aarch64
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || skip "not root: binfmt_misc, mmdebstrap and chroot need root"
if ! command -v mmdebstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
    command -v apt-get >/dev/null || skip "no apt-get to install qemu-user-static binfmt-support mmdebstrap"
    say "installing qemu-user-static binfmt-support mmdebstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static \
        binfmt-support mmdebstrap; } >/dev/null 2>&1 || skip "apt-get could not install qemu-user-static binfmt-support mmdebstrap"
fi
grep -q binfmt_misc /proc/mounts || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
    || skip "binfmt_misc cannot be mounted (a container without it?)"
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || skip "qemu-aarch64 binfmt not enabled"
say "qemu $(/usr/bin/qemu-aarch64-static --version | head -1 | awk '{print $3}'), binfmt qemu-aarch64 enabled"

# ---- the arm64 root, cached
MMDEB=(mmdebstrap --arch=arm64 --variant=minbase --include=python3 bookworm)
ROOT=$CACHE/arm64-root-$(echo "${MMDEB[*]}" | sha256sum | cut -c1-12)
mkdir -p "$CACHE"
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    t=$SECONDS; rm -rf "$ROOT.tmp"
    nice "${MMDEB[@]}" "$ROOT.tmp" >"$CACHE/mmdebstrap.log" 2>&1 || fail "mmdebstrap (log: $CACHE/mmdebstrap.log)"
    mv "$ROOT.tmp" "$ROOT"
    say "arm64 root built in $((SECONDS - t)) s: $ROOT"
else
    say "arm64 root cached: $ROOT"
fi

# ---- aarch64 wheels of the daemon's dependencies, cached; the daemon from a wheel built here
WORK=$(mktemp -d /tmp/eoedge-aarch64.XXXXXX)
REQ=$WORK/requirements.txt
requirements pytest pytest-timeout >"$REQ"
TAGS=(--platform manylinux2014_aarch64)
for m in 17 24 26 27 28 31 34 35 36; do TAGS+=(--platform "manylinux_2_${m}_aarch64"); done
SITE=$CACHE/arm64-site-$(cat "$REQ" <(echo "${TAGS[*]}") | sha256sum | cut -c1-12)
if [ ! -d "$SITE" ]; then
    t=$SECONDS; rm -rf "$SITE.tmp"
    "$BIN/pip" install -q --target "$SITE.tmp" --only-binary=:all: --implementation cp --python-version 3.11 \
        "${TAGS[@]}" -r "$REQ" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; fail "aarch64 wheels"; }
    mv "$SITE.tmp" "$SITE"
    say "aarch64 wheels fetched in $((SECONDS - t)) s: $SITE"
else
    say "aarch64 wheels cached: $SITE"
fi
[ -d "$SITE/torch" ] && fail "torch is in the aarch64 site"
say "aarch64 site: $(ls "$SITE" | grep -iE '^(openvino|numpy|pyzmq|opencv_python_headless|cryptography)-[0-9].*dist-info$' | sed 's/.dist-info//' | tr '\n' ' ')"
WHEEL=$(daemon_wheel "$WORK/wheel") || exit 1
"$BIN/pip" install -q --no-deps --target "$WORK/app" "$WHEEL" >/dev/null 2>&1 || fail "install the wheel"
say "daemon wheel: $(basename "$WHEEL")"

# ---- bundles for rpi4 (fp32) and rpi5 (fp16), built by the ground here
t=$SECONDS
.ci/bundles.sh "$WORK/bundles" rpi4:fp32 rpi5:fp16 >/dev/null || fail "ground bundles"
say "ground bundles built in $((SECONDS - t)) s"

# ---- the root: the daemon, its site, the tests and bundles bound in; /proc /sys /dev
MOUNTS=()
bind() { mkdir -p "$ROOT$2" && mount --bind "$1" "$ROOT$2" && MOUNTS=("$ROOT$2" "${MOUNTS[@]}"); }
cleanup() { for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$ROOT/proc" && mount -t proc proc "$ROOT/proc" && MOUNTS=("$ROOT/proc")
bind /sys /sys; bind /dev /dev
bind "$WORK/app" /opt/eoedge/app; bind "$SITE" /opt/eoedge/site; bind "$REPO/tests" /opt/eoedge/tests
bind "$REPO/.ci" /opt/eoedge/.ci; bind "$WORK/bundles" /opt/eoedge/bundles

status=0; CHROOT=$(command -v chroot)
for pair in cortex-a72:rpi4 cortex-a76:rpi5; do
    cpu=${pair%%:*} profile=${pair#*:}; t=$SECONDS
    run=(env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU=$cpu EOEDGE_PROFILE=$profile
         EOEDGE_BUNDLES=/opt/eoedge/bundles PYTHONPATH=/opt/eoedge/app:/opt/eoedge/site
         "$CHROOT" "$ROOT" /usr/bin/python3)
    if ! "${run[@]}" -m pytest -q -s -p no:cacheprovider --rootdir /opt/eoedge /opt/eoedge/.ci/flight_test.py \
        >"$WORK/$cpu.log" 2>&1; then
        status=1; tail -40 "$WORK/$cpu.log"
    fi
    grep -oE 'RESULT.*|[0-9]+ (passed|failed).*' "$WORK/$cpu.log" | sed "s/^/[aarch64 $cpu] /"
    "${run[@]}" /opt/eoedge/.ci/refdiff.py compare "/opt/eoedge/bundles/$profile-v1" \
        "/opt/eoedge/bundles/$profile-v1.host.npz" 2>&1 | grep -v MIDR_EL1 | sed "s/^/[aarch64 $cpu] /"
    say "$cpu ($profile) done in $((SECONDS - t)) s"
done
say "aarch64 job: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - T0)) s"
exit $status
