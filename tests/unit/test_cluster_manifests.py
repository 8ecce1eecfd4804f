"""The cluster recipes start: token auth with a token every node shares, GPU counts that match
the configs they run, a run directory on storage every node mounts. Structural checks of the
fields Ray's launcher and KubeRay read (no cluster here), and cluster/up.sh against a fake
`ray` that records its calls."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from cai_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8}


def config_gpus(path: str) -> float:
    p = load_config(ROOT / path, check_env=False).placement
    return sum(r.num_actors * r.num_gpus for r in (p.rollout, p.feedback, p.reward, p.trainer,
                                                   p.reference))


def _rayjob() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "rayjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    return kinds["RayJob"], kinds["PersistentVolumeClaim"]


def _pods(job: dict) -> list[tuple[dict, int]]:
    spec = job["spec"]["rayClusterSpec"]
    out = [(spec["headGroupSpec"]["template"]["spec"], 1)]
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        out.append((g["template"]["spec"], g["replicas"]))
    return out


def test_rayjob_token_auth_is_generated_by_the_operator() -> None:
    job, _ = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52)
    for pod, _ in _pods(job):
        for c in pod["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            # turning token mode on by hand without a token is what stopped `ray start`
            assert "RAY_AUTH_MODE" not in names or "RAY_AUTH_TOKEN" in names


def test_rayjob_gpus_match_its_config_and_runs_are_shared() -> None:
    job, pvc = _rayjob()
    entry = job["spec"]["entrypoint"].split()
    config, output = entry[entry.index("--config") + 1], entry[entry.index("--output") + 1]
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * n
               for pod, n in _pods(job) for c in pod["containers"])
    assert gpus == config_gpus(config) == 8
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    head_gpus = int(head["template"]["spec"]["containers"][0]["resources"]["limits"].get(
        "nvidia.com/gpu", 0))
    assert int(head["rayStartParams"].get("num-gpus", head_gpus)) == head_gpus
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for pod, _ in _pods(job):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = [m for m in c["volumeMounts"] if output.startswith(m["mountPath"] + "/")]
            assert mounts, f"{c['name']} does not mount {output}"
            assert claims[mounts[0]["name"]] == pvc["metadata"]["name"]


def test_launcher_shares_token_and_storage_and_fits_the_multinode_config() -> None:
    cfg = yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())
    assert any(dst.endswith("/.ray/auth_token") and src == "~/.ray/auth_token"
               for dst, src in cfg["file_mounts"].items())
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any("/shared" in c and "mount" in c for c in cfg["initialization_commands"])
    types = cfg["available_node_types"]
    gpus = (GPUS_PER_INSTANCE[types[cfg["head_node_type"]]["node_config"]["InstanceType"]] +
            sum(GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]] * t.get("min_workers", 0)
                for name, t in types.items() if name != cfg["head_node_type"]))
    assert gpus >= config_gpus("configs/gpu-multinode.yaml") == 16


def test_up_generates_the_token_once_then_starts_the_cluster(tmp_path: Path) -> None:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "ray"
    fake.write_text("#!/usr/bin/env bash\n"
                    f"echo \"$*\" >> {calls}\n"
                    "if [ \"$1\" = get-auth-token ]; then mkdir -p \"$HOME/.ray\"; "
                    "printf tok123 > \"$HOME/.ray/auth_token\"; fi\n")
    fake.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for _ in range(2):
        subprocess.run(["bash", str(ROOT / "cluster" / "up.sh"), "-y"], env=env, check=True)
    lines = calls.read_text().splitlines()
    assert lines[0] == "get-auth-token --generate"
    assert lines[1:] == [f"up {ROOT / 'cluster' / 'launcher.yaml'} -y"] * 2  # generated once
    assert (home / ".ray" / "auth_token").read_text() == "tok123"
