#!/usr/bin/env bash
# Installs the pinned stack from requirements.lock into .venv/, then the project (editable), and builds
# the input pipeline's compiled pass
# (pipeline/native.c, < 1 s; rebuilt whenever its source changes). Otherwise a no-op when the stamp
# matches the lock file and the variant (cpu, or cuda where nvidia-smi lists a GPU), then verifies the
# install (python -m launch.doctor --verify-install).
set -euo pipefail
cd "$(dirname "$0")/.."
# Needs: Python >= 3.11 (PYTHON=... picks the interpreter, default python3) and a C compiler (cc / gcc:
# the pipeline's compiled pass is built here). DeepSpeed's CPU comm op is never built: training skips
# it (parallel.env.skip_shm_comm_op).
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "install: $PY is $("$PY" --version 2>&1 || echo missing); Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  echo "install: no C compiler (cc or gcc) found; install one (e.g. apt-get install gcc) and rerun make install" >&2
  exit 2
fi
VENV=.venv
LOCK=requirements.lock
STAMP=$VENV/.installed
# The variant follows the host: cuda where nvidia-smi lists a GPU, else cpu; RANKMIXER_VARIANT=cpu|cuda
# overrides. The stamp records it, so moving a checkout to a GPU host reinstalls.
variant=${RANKMIXER_VARIANT:-}
if [ -z "$variant" ]; then
  variant=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda; fi
fi
case $variant in cpu|cuda) ;; *) echo "install: RANKMIXER_VARIANT=$variant; expected cpu or cuda" >&2; exit 2;; esac
want="$(sha256sum "$LOCK" pyproject.toml | sha256sum | cut -c1-16) variant=$variant"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  $VENV/bin/python -m pipeline.native >/dev/null
  exit 0
fi
echo "[install] creating $VENV with $($PY --version)"
[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
stage() { awk -v s="$1" '/^# stage:/{on=($3==s); next} on && NF && !/^#/' "$LOCK"; }
echo "[install] variant: $variant"
if [ $variant = cuda ]; then
  # --isolated: no local wheel cache (find-links), whose CPU build 2.13.0+cpu also satisfies torch==2.13.0;
  # the CUDA build comes from PyTorch's index (TORCH_INDEX_URL to use a mirror or another CUDA version)
  $PIP --isolated --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" $(stage torch)
  $PIP fbgemm-gpu==$(stage fbgemm | sed 's/.*==//')
else
  $PIP $(stage torch)
  $PIP $(stage fbgemm)
fi
$PIP --no-deps $(stage nodeps)
$PIP $(stage deps)
$PIP --no-build-isolation $(stage nobuildiso)
$PIP $(stage rest)
$PIP --no-deps --no-build-isolation -e .
echo "[install] building the input pipeline's compiled pass (pipeline/native.c)"
$VENV/bin/python -m pipeline.native >/dev/null
# torch sees CUDA iff this is the cuda variant, and fbgemm's ops run on that device; else one line + the fix
$VENV/bin/python -m launch.doctor --verify-install $variant
echo "$want" > "$STAMP"
echo "[install] done"
