#!/usr/bin/env bash
# Bundles the ground builds on this host for the CI jobs (.ci/aarch64.sh, .ci/myriad.sh), with the
# real commands: a mini run folder (tests/ground/mini_run.py: generated imagery, an untrained
# TinyUNet student), `eoedge ground export --profile P --precision X`, `eoedge ground bundle
# --profile P` (versions 1 and 2, the second for a rollback), each v1 extracted beside its tar
# with the host's exact f32 outputs on its reference tiles (.ci/refdiff.py write).
#   usage: .ci/bundles.sh OUT PROFILE:PRECISION ...     e.g. .ci/bundles.sh /tmp/b rpi4:fp32 rpi5:fp16
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EOEDGE_BIN:-.venv/bin}
OUT=$(realpath -m "$1"); shift
mkdir -p "$OUT"
[ -d "$OUT/mini" ] || "$BIN/python" -c "import sys; sys.path.insert(0, 'tests/ground')
from pathlib import Path; from mini_run import make_run; make_run(Path(sys.argv[1]))" "$OUT"
[ -f "$OUT/keys/uplink.key" ] || "$BIN/python" -m eoedge shared keygen --out "$OUT/keys" >/dev/null
for spec in "$@"; do
    profile=${spec%%:*} precision=${spec#*:}
    "$BIN/python" -m eoedge ground export "$OUT/mini" --profile "$profile" --precision "$precision" --no-eval \
        --name "$profile" >/dev/null 2>&1
    for v in 1 2; do
        parent=(); [ "$v" = 1 ] || parent=(--parent "cloud-$profile:1")
        "$BIN/python" -m eoedge ground bundle "$OUT/mini" --export "export/$profile" --key "$OUT/keys/uplink.key" \
            --model-id "cloud-$profile" --version "$v" "${parent[@]}" --profile "$profile" \
            --json > "$OUT/$profile-v$v.json"
        cp "$OUT/mini/bundles/cloud-$profile-v$v.tar" "$OUT/$profile-v$v.tar"    # --out must stay in the run
    done
    rm -rf "$OUT/$profile-v1"        # verified and decoded (members may be stored xz-compressed)
    "$BIN/python" -c "import sys; from shared.bundle import extract_bundle
extract_bundle(sys.argv[1], sys.argv[2], sys.argv[3])" "$OUT/$profile-v1.tar" "$OUT/$profile-v1" "$OUT/keys/uplink.pub"
    "$BIN/python" .ci/refdiff.py write "$OUT/$profile-v1" "$OUT/$profile-v1.host.npz"
    echo "bundles for $profile ($precision): $OUT/$profile-v1.tar, $OUT/$profile-v2.tar"
done
