"""Print the job's runtime environment as JSON: runtime_env.yaml plus the secrets (W&B key,
HF token) present in the submitting shell. Used by submit.sh; prints nothing else."""

import json
import os
from pathlib import Path

import yaml

env = yaml.safe_load((Path(__file__).parent / "runtime_env.yaml").read_text())
env.setdefault("env_vars", {}).update(
    {k: os.environ[k] for k in ("WANDB_API_KEY", "HF_TOKEN") if os.environ.get(k)})
print(json.dumps(env))
