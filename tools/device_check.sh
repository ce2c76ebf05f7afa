#!/usr/bin/env bash
# The GPU check of d2_refine, one command (docs/GPU.md):
#
#   tools/device_check.sh [--out DIR] [--deps DIR] [--only STEP ...] [--skip STEP ...]   # on a CUDA machine
#   tools/device_check.sh --dry-run --out DIR                                              # CPU, tiny sizes
#
# --deps DIR (default .device): a folder prepared as docs/GPU.md says, for a machine without a package index:
# DIR/wheels/*.whl are installed into a private target folder, and DIR itself (holding detectron2's Python
# package) goes on PYTHONPATH. Everything else is tools/device_check.py (its --help lists the steps).
set -euo pipefail
cd "$(dirname "$0")/.."

deps=.device
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --deps) deps="$2"; shift 2 ;;
    --deps=*) deps="${1#--deps=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

PYTHON=${PYTHON:-python3}
if [ -d "$deps/wheels" ] && compgen -G "$deps/wheels/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/d2_refine_device_site"
  echo "[device_check] installing $(ls "$deps"/wheels/*.whl | wc -l) carried wheels into $site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$deps"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$deps/detectron2" ]; then
  export PYTHONPATH="$(cd "$deps" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
# the repository itself (the op library is built in place), ahead of any installed copy
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/device_check.py ${args[@]+"${args[@]}"}
