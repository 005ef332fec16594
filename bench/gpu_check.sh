#!/usr/bin/env bash
# GPU validation (issue 19): set up the environment, then run bench/gpu_check.py's checks and print
# a table (check, result, figure, target). At most 9 minutes (GPU_CHECK_TOTAL_S); idempotent.
#   bash bench/gpu_check.sh [gpu_check.py args]   on a CUDA machine, e.g. --budget 420 --json $OUT/table.json
#   bash bench/gpu_check.sh --cpu-dry-run         on a CPU: every step's CPU-side part (first argument)
#   bash bench/gpu_check.sh --fetch-wheels        where PyPI is reachable: wheels a machine without it needs, into .whl/
#
# Environment. A machine whose python3 already has a CUDA build of torch (the lent H200's image:
# Python 3.12, torch 2.11+cu130, no package registry) keeps it: its CPU wheel pin does not apply, and
# what it lacks goes into .gpu-site/ (on PYTHONPATH): megatron-core from .whl/ (--fetch-wheels, then
# carry .whl) or PyPI, Transformer Engine from PyPI when reachable. Any other machine gets
# launch/setup_env.sh's .venv (torch==2.13.0 from PyPI is a CUDA build there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MCORE="megatron-core==0.16.1"
TE_VERSION="2.11.0"  # megatron-core 0.16.1 asks for transformer-engine >=2.9,<2.12 (its dev extra)
WHEELS="$ROOT/.whl"
SITE="$ROOT/.gpu-site"
say() { echo "[gpu_check] $*"; }

if [ "${1:-}" = "--fetch-wheels" ]; then
  # For the H200 image's Python. Transformer Engine's core wheel (transformer_engine_cu13 2.11.0:
  # 179 MB) is over the device tool's 64 MiB carry limit, so it is not fetched.
  PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$MCORE"
  ls -l "$WHEELS"
  exit 0
fi

pip_quick=(--disable-pip-version-check --quiet --retries 0 --timeout 15)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  bash launch/setup_env.sh test
  PY="$ROOT/.venv/bin/python"
elif python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY="$(command -v python3)"
  mkdir -p "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "using $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
  if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    say "installing $MCORE into $SITE"
    if compgen -G "$WHEELS/megatron_core-*.whl" >/dev/null; then  # carried: no registry needed
      "$PY" -m pip install "${pip_quick[@]}" --no-index --no-deps --target "$SITE" "$WHEELS"/megatron_core-*.whl
    else
      "$PY" -m pip install "${pip_quick[@]}" --no-deps --target "$SITE" "$MCORE" || say "megatron-core: not installed"
    fi
  fi
  for mod in yaml numpy psutil tqdm tokenizers; do  # the project's own dependencies (all in the H200 image)
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install "${pip_quick[@]}" --target "$SITE" "$mod" || true
  done
else
  bash launch/setup_env.sh test
  PY="$ROOT/.venv/bin/python"
  SITE=""
fi

if [ "${1:-}" != "--cpu-dry-run" ] && ! "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
  cuda_major="$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')"
  say "installing transformer-engine $TE_VERSION (core_cu$cuda_major; the torch part builds against this torch)"
  target=(); [ -n "$SITE" ] && target=(--target "$SITE")
  # Core wheels first, then the torch extension without build isolation (it compiles against this
  # torch; an isolated build would fetch another). Hopper only, all cores.
  if timeout "${TE_INSTALL_TIMEOUT:-240}" "$PY" -m pip install "${pip_quick[@]}" "${target[@]}" \
       "transformer-engine[core_cu$cuda_major]==$TE_VERSION" \
     && NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS:-90}" MAX_JOBS="$(nproc)" \
       timeout "${TE_INSTALL_TIMEOUT:-240}" "$PY" -m pip install "${pip_quick[@]}" "${target[@]}" \
       --no-build-isolation "transformer-engine-torch==$TE_VERSION"; then
    say "transformer-engine installed"
  else
    # A half-installed TE (its Python part without the built extension) would still import as
    # `transformer_engine` and make pretrain pick the TE spec: remove it.
    if [ -n "$SITE" ]; then rm -rf "$SITE"/transformer_engine*; else
      "$PY" -m pip uninstall --quiet -y transformer-engine "transformer-engine-cu$cuda_major" transformer-engine-torch || true; fi
    say "transformer-engine could not be installed: the TE checks fail, the others run on the local spec"
  fi
fi

# The checks get what is left of GPU_CHECK_TOTAL_S (default 9 minutes) after the set-up.
budget=()
case " $* " in *" --budget "* | *" --cpu-dry-run "*) ;; *) budget=(--budget "$((${GPU_CHECK_TOTAL_S:-540} - SECONDS))") ;; esac
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec "$PY" bench/gpu_check.py "${budget[@]}" "$@"
