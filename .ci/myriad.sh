#!/usr/bin/env bash
# CI job: bundles for the Myriad X, checked against the runtime that flies them there.
#
#   bash .ci/myriad.sh
#
# OpenVINO 2022.3 LTS is the last runtime with the MYRIAD plugin; its PyPI wheels are for
# CPython 3.7-3.10 on x86_64 and hold no MYRIAD plugin (CPU only), so this proves everything
# but the VPU itself:
# 1. a Python 3.10 venv (pyenv's 3.10, or python3.10 on PATH) with openvino==2022.3.* and the
#    daemon's other dependencies, cached under $EOEDGE_CI_CACHE (/var/cache/eoedge-ci) by a hash
#    of the requirements; the daemon from a wheel built here;
# 2. the ground builds a myriadx bundle here (.ci/bundles.sh: op versions rewritten for 2022.3,
#    the IR checked before signing) and, for contrast, a cpu-x86 export (not rewritten);
# 3. `eoedge ground check-ir --profile myriadx` passes the first and flags the second, and
#    `eoedge ground bundle --profile myriadx` refuses the second before signing;
# 4. in the 3.10 venv: OpenVINO 2022.3 reads the rewritten IR and refuses the other one, and
#    .ci/flight_test.py runs the real daemon (CURVE keys, f32 forced: the CPU plugin's default on an
#    AMX host is bf16) on the myriadx bundle: uplink, install with self-test, a frame, rollback;
#    .ci/refdiff.py prints max |p - p_host_f32| at f32 and f16.
# A step that cannot run here says so in one line (SKIP) and the job ends without failing.
JOB=myriad
source "$(dirname "$0")/lib.sh"

PY310=$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.10*/bin/python3.10 2>/dev/null | tail -1)
[ -n "$PY310" ] || PY310=$(command -v python3.10 || true)
[ -n "$PY310" ] || skip "no CPython 3.10 (pyenv install 3.10, or python3.10 on PATH): OpenVINO 2022.3 needs <= 3.10"
say "CPython 3.10: $PY310 ($("$PY310" -V 2>&1))"

# ---- the 3.10 venv with OpenVINO 2022.3, cached
mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/eoedge-myriad.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
REQ=$WORK/requirements.txt
requirements "openvino==2022.3.*" pytest pytest-timeout >"$REQ"
VENV=$CACHE/py310-ov2022.3-$(cat "$REQ" <("$PY310" -V 2>&1) | sha256sum | cut -c1-12)
if [ ! -x "$VENV/bin/python" ]; then
    t=$SECONDS; rm -rf "$VENV.tmp"
    { "$PY310" -m venv "$VENV.tmp" && "$VENV.tmp/bin/pip" install -q -r "$REQ"; } >"$WORK/pip.log" 2>&1 \
        || { tail -5 "$WORK/pip.log"; skip "pip could not install openvino==2022.3.* for Python 3.10"; }
    mv "$VENV.tmp" "$VENV"
    # a venv's scripts name its folder: the moved one is used through `$VENV/bin/python -m` only
    say "Python 3.10 venv built in $((SECONDS - t)) s: $VENV"
else
    say "Python 3.10 venv cached: $VENV"
fi
WHEEL=$(daemon_wheel "$WORK/wheel") || exit 1
"$VENV/bin/python" -m pip install -q --no-deps --target "$WORK/app" "$WHEEL" >/dev/null 2>&1 || fail "install the wheel"
say "daemon wheel: $(basename "$WHEEL"); $("$VENV/bin/python" -m pip list 2>/dev/null | grep -E '^openvino ' | tr -s ' ')"

# ---- the ground: a myriadx bundle, and a cpu-x86 export that was not rewritten
t=$SECONDS
.ci/bundles.sh "$WORK/bundles" myriadx:fp32 >/dev/null || fail "ground bundles"
"$BIN/python" -m eoedge ground export "$WORK/bundles/mini" --profile cpu-x86 --no-eval --name cpu-x86 >/dev/null 2>&1 \
    || fail "cpu-x86 export"
say "ground bundles built in $((SECONDS - t)) s"
GOOD=$WORK/bundles/mini/export/myriadx/model.xml BAD=$WORK/bundles/mini/export/cpu-x86/model.xml
status=0
"$BIN/python" -m eoedge ground check-ir "$GOOD" --profile myriadx | head -1 | sed 's/^/[myriad] /' || status=1
if "$BIN/python" -m eoedge ground check-ir "$BAD" --profile myriadx >"$WORK/bad.txt"; then
    status=1; say "FAIL: check-ir passed an IR with opset14/opset11 layers"
fi
head -1 "$WORK/bad.txt" | sed 's/^/[myriad] /'; sed -n '2p;5p' "$WORK/bad.txt" | sed 's/^/[myriad] /'
if "$BIN/python" -m eoedge ground bundle "$WORK/bundles/mini" --export export/cpu-x86 --key "$WORK/bundles/keys/uplink.key" \
    --model-id cloud-x86 --version 1 --profile myriadx >/dev/null 2>"$WORK/refused.txt"; then
    status=1; say "FAIL: bundle signed an IR the myriadx profile refuses"
fi
sed 's/^/[myriad] bundle --profile myriadx of the cpu-x86 export: /' "$WORK/refused.txt" | cut -c1-220

# ---- OpenVINO 2022.3 on Python 3.10: the IRs, the daemon, the reference outputs
cp -r "$REPO/tests" "$REPO/.ci" "$WORK/"          # the harness, away from the source packages
run=(env PYTHONPATH="$WORK/app" EOEDGE_PROFILE=myriadx EOEDGE_BUNDLES="$WORK/bundles" "$VENV/bin/python")
(cd "$WORK" && "${run[@]}" - "$GOOD" "$BAD" <<'PY'
import sys
from onboard import ov
for path in sys.argv[1:]:
    try:
        ov.Core().compile_model(ov.Core().read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        print(f"[myriad] OpenVINO {ov.VERSION} reads and compiles {path.split('/')[-2]}/model.xml on CPU")
    except RuntimeError as exc:
        line = next((l for l in str(exc).splitlines() if "opset" in l), str(exc).splitlines()[0])
        print(f"[myriad] OpenVINO {ov.VERSION} refuses {path.split('/')[-2]}/model.xml: {line.strip()[:160]}")
PY
) || status=1
t=$SECONDS
if ! (cd "$WORK" && "${run[@]}" -m pytest -q -s -p no:cacheprovider --rootdir "$WORK" .ci/flight_test.py \
      >"$WORK/flight.log" 2>&1); then
    status=1; tail -40 "$WORK/flight.log"
fi
grep -oE 'RESULT.*|[0-9]+ (passed|failed).*' "$WORK/flight.log" | sed 's/^/[myriad] /'
(cd "$WORK" && "${run[@]}" .ci/refdiff.py compare bundles/myriadx-v1 bundles/myriadx-v1.host.npz) 2>&1 \
    | sed 's/^/[myriad] /'
say "daemon on OpenVINO 2022.3 done in $((SECONDS - t)) s"
say "myriad job: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - T0)) s"
exit $status
