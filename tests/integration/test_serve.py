"""HTTP services: bearer auth, body and batch limits, and scores equal to the in-process ones."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cai_ray.config import ModelSpec, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"
TOKEN = "s3cret-token-for-tests"


def post(url: str, body: bytes, token: str | None, ctype: str = "application/json"
         ) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": ctype})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def services(ray_local, tiny_model_dir, tmp_path_factory):
    import torch

    from cai_ray.actors.feedback import feedback_group
    from cai_ray.actors.reward import load_reward_model, reward_group, save_reward_model
    from cai_ray.constitution import load_constitution
    from cai_ray.labelling import Labeller
    from cai_ray.models import load_tokenizer
    from cai_ray.preflight import resolve_path
    from cai_ray.serve import Service, judge_handler, pm_handler

    spec = ModelSpec(path="tiny-llama")
    torch.manual_seed(0)
    pm = tmp_path_factory.mktemp("pm")
    save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec), pm)
    cfg = load_config(TINY, ["serve.port=0", "serve.max_items=4", "serve.max_body_bytes=4096"])
    rg = reward_group(cfg, ModelSpec(path=str(pm), dtype="float32"), None)
    fb = feedback_group(cfg)
    lab = Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))
    svc = Service(cfg.serve, TOKEN, {"/v1/score": pm_handler(rg), "/v1/judge":
                                     judge_handler(fb, lab)})
    svc.serve_in_thread()
    host, port = svc.address
    try:
        yield f"http://{host}:{port}", rg, fb, lab
    finally:
        svc.close()
        rg.shutdown()
        fb.shutdown()


ITEMS = [{"prompt": "How do I stay safe online?", "response": "Use strong passwords."},
         {"messages": [{"role": "user", "content": "Hi"}], "response": "Hello! How can I help?"}]


def test_auth_and_limits(services) -> None:
    url = services[0]
    body = json.dumps({"items": ITEMS}).encode()
    assert post(f"{url}/v1/score", body, None)[0] == 401
    assert post(f"{url}/v1/score", body, "wrong")[0] == 401
    assert post(f"{url}/v1/score", b"x" * 5000, TOKEN)[0] == 413
    too_many = json.dumps({"items": ITEMS * 3}).encode()
    status, err = post(f"{url}/v1/score", too_many, TOKEN)
    assert status == 413 and "max_items" in err["error"]
    status, err = post(f"{url}/v1/score", json.dumps({"items": [{"prompt": "x"}]}).encode(),
                       TOKEN)
    assert status == 400 and "items[0].response" in err["error"]
    assert post(f"{url}/v1/score", body, TOKEN, ctype="text/plain")[0] == 415
    assert post(f"{url}/v1/nothing", body, TOKEN)[0] == 404
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as r:
        assert json.loads(r.read())["services"] == ["/v1/judge", "/v1/score"]


def test_valid_requests_match_in_process_results(services) -> None:
    from cai_ray.actors.reward import RewardWorker

    url, rg, fb, lab = services
    status, out = post(f"{url}/v1/score", json.dumps({"items": ITEMS}).encode(), TOKEN)
    assert status == 200
    direct = rg.shard_and_gather(RewardWorker.score, [
        ([{"role": "user", "content": ITEMS[0]["prompt"]}], ITEMS[0]["response"]),
        (ITEMS[1]["messages"], ITEMS[1]["response"])])
    assert out["scores"] == pytest.approx(direct, abs=1e-6)

    pair = {"prompt": "Tell me a joke.", "response_a": "Why did the chicken cross the road?",
            "response_b": "No.", "aspect": "helpful"}
    status, out = post(f"{url}/v1/judge", json.dumps({"items": [pair]}).encode(), TOKEN)
    assert status == 200 and 0.0 <= out["p_a"][0] <= 1.0
    again = post(f"{url}/v1/judge", json.dumps({"items": [pair]}).encode(), TOKEN)[1]
    assert again["p_a"] == pytest.approx(out["p_a"], abs=1e-6)  # same principles, same label
    status, err = post(f"{url}/v1/judge", json.dumps({"items": [{**pair, "aspect": "x"}]})
                       .encode(), TOKEN)
    assert status == 400 and "aspect" in err["error"]


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "CAI_RAY_SERVE_TOKEN"}
    p = subprocess.run([sys.executable, "-m", "cai_ray.cli", "serve", "--config", str(TINY),
                        "--output", str(tmp_path), "--what", "judge"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "CAI_RAY_SERVE_TOKEN" in p.stderr and "Traceback" not in p.stderr
