#!/usr/bin/env bash
# The trainer's GPU path on a CUDA machine that has torch and transformers but no Ray, vLLM or
# DeepSpeed, and no network (benchmarks/gpu_check.py says what is checked).
#
#   bash benchmarks/gpu_check.sh prepare   # here, with an index: DeepSpeed and its missing
#                                          # dependencies as wheels into .whl/ (~5 MB)
#   bash benchmarks/gpu_check.sh           # there, with .whl/ beside the repo: install them
#                                          # into /tmp/site and run the check (≤ 8 min)
#
# Results: $OUT/gpu_check.json (or runs/gpu-check/), one PASS/FAIL line per check on stdout;
# the exit status is the check's. GPU_CHECK_ARGS passes options on (e.g. --no-throughput).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
PY=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
    # Python 3.12 wheels for the GPU machine's interpreter. DeepSpeed publishes only a source
    # archive: it is built here into a pure-Python wheel (its ops JIT-compile where they run).
    mkdir -p "$WHL"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHL" \
        pydantic==2.14.4 pydantic-core==2.50.5 hjson==3.1.0 annotated-types==0.8.0 \
        typing-inspection==0.4.5
    venv_py=.venv/bin/python   # has torch, which DeepSpeed's setup imports
    [ -x "$venv_py" ] || venv_py=$PY
    (cd /tmp && DS_BUILD_OPS=0 "$OLDPWD/$venv_py" -m pip wheel -q --no-deps \
        --no-build-isolation -w "$OLDPWD/$WHL" deepspeed==0.19.8)
    ls -la "$WHL"
    exit 0
fi

t0=$(date +%s)
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    [ -d "$WHL" ] || { echo "no DeepSpeed and no $WHL/: run 'bash $0 prepare' first" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHL"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# 450 s for the check itself: with the install and the first CUDA start it stays under 8 min.
rc=0
timeout 450 "$PY" benchmarks/gpu_check.py --device cuda ${GPU_CHECK_ARGS:-} || rc=$?
echo "gpu_check: exit $rc after $(( $(date +%s) - t0 )) s"
exit $rc
