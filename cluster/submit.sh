#!/usr/bin/env bash
# Submit a cai-ray command to a Ray cluster as a job, with Ray's token authentication on.
#
#   RAY_ADDRESS=http://head:8265 cluster/submit.sh pipeline --config configs/gpu-1node.yaml \
#       --output /shared/runs/exp1 [--resume]
#
# The token is read from $RAY_AUTH_TOKEN or ~/.ray/auth_token (Ray 2.60 enables token auth by
# default; `ray get-auth-token` prints the head's). WANDB_API_KEY and HF_TOKEN, when set, are
# forwarded as job environment variables, never echoed. The run directory must be on storage
# every node sees (checkpoints are written by the trainer ranks, read back by --resume).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$#" -eq 0 ]; then
    sed -n '2,10p' "$here/submit.sh"
    exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the head, e.g. http://head:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -f "$HOME/.ray/auth_token" ]; then
    RAY_AUTH_TOKEN="$(cat "$HOME/.ray/auth_token")"
    export RAY_AUTH_TOKEN
fi
cd "$here/.."
# runtime_env.yaml plus the secrets present in this shell, as one JSON document.
runtime_env="$(python3 "$here/runtime_env.py")"
exec ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" \
    --submission-id "cai-ray-$(date +%Y%m%d-%H%M%S)" \
    -- python -m cai_ray.cli "$@" run.ray_address=auto
