# Sourced by the CI jobs (.ci/aarch64.sh, .ci/myriad.sh) with JOB set: the repo, the cache, the
# host venv, one-line messages, and what both jobs build from the repo.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
CACHE=${EOEDGE_CI_CACHE:-/var/cache/eoedge-ci}     # kept between runs on this machine
BIN=${EOEDGE_BIN:-$REPO/.venv/bin}                  # the host venv (make venv): the ground's libraries,
                                                    # pip; `python -m eoedge` here runs this repo's code
T0=$SECONDS
say() { echo "[$JOB +$((SECONDS - T0))s] $*"; }
skip() { say "SKIP: $*"; exit 0; }                  # cannot run here: one line, no failure
fail() { say "FAIL: $*"; exit 1; }

# The daemon's requirements (pyproject: dependencies + the onboard extra) and the arguments, one a line.
requirements() {
    "$BIN/python" - "$@" <<'PY'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["onboard"] + sys.argv[1:]))
PY
}

# The daemon as a wheel built here (`pip wheel . --no-deps`) in folder $1; prints its path.
daemon_wheel() {
    "$BIN/pip" wheel -q . --no-deps --no-build-isolation -w "$1" >/dev/null 2>&1 || fail "pip wheel ." >&2
    ls "$1"/eoedge-*.whl
}
