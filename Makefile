# make install | test | test-mcore019 | lint | demo | demo-gae | gpu-smoke | wheelhouse. Everything runs inside ./.venv
# (Python 3.11, megatron-core 0.16.1), test-mcore019 and wheelhouse inside ./.venv-mcore019 (Python 3.12,
# megatron-core 0.19.2), gpu-smoke inside ./.venv-gpu.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The second leg's interpreter: pyenv's 3.12 where there is one, else python3.12 on PATH.
PYTHON312 ?= $(shell PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null || command -v python3.12)
VENV019 := .venv-mcore019

.PHONY: install install-mcore019 test test-mcore019 lint demo demo-gae clean gpu-smoke wheelhouse

# On a machine that already has torch (an NGC container, a cluster image) the venv sees it and keeps it;
# otherwise torch==2.13.0 is installed, which is the CPU build on our CPU machines.
$(VENV)/.installed: setup.py
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q torch==2.13.0; \
	fi
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Python 3.12 takes megatron-core 0.19 (setup.py). PyPI's torch for 3.12 is its CUDA build, which imports and runs
# on a CPU machine; 2.14.1 is the newest release pip's cap on our machines admits.
$(VENV019)/.installed: setup.py
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 found; pass PYTHON312=/path/to/python3.12"; exit 2; }
	$(PYTHON312) -m venv $(VENV019)
	$(VENV019)/bin/pip install -q torch==2.14.1
	$(VENV019)/bin/pip install -q -e ".[dev]"
	touch $@

install-mcore019: $(VENV019)/.installed

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS) tests

# The megatron-core 0.19 leg: every test marked `megatron` (tests/conftest.py: whatever builds a Megatron model,
# optimizer or checkpoint, converts, or runs the trainer, the recipe twin included) and the device wheelhouse check.
test-mcore019: install-mcore019
	$(VENV019)/bin/python -m pytest -q -p no:cacheprovider --timeout=900 -m "megatron or mcore019" $(PYTEST_ARGS) tests

lint: install
	$(PY) -m ruff check megatron_sapo tools tests bench recipes

clean:
	rm -rf $(VENV) $(VENV019) $(VENV)-gpu build *.egg-info

# The CPU demo: tiny Qwen3-MoE, warm start, conversion, SAPO under torchrun (EP=2), metrics plot (~5 min).
demo: install
	bash recipes/tiny_moe/demo.sh

# The same task with GAE: a Megatron critic (the policy's trunk + a value head) trained every step, the actor from
# step 5 (trainer.critic_warmup), advantages from the critic's values (README: "The critic (GAE)").
demo-gae: install
	OUT=outputs/demo_gae bash recipes/tiny_moe/demo.sh algorithm.adv_estimator=gae critic.optim.lr=3e-4 \
		critic.optim.weight_decay=0 trainer.critic_warmup=5

# One H100/H200 with torch (CUDA) already installed and no network: the Qwen3-30B-A3B recipe's switches through the
# trainer on a tiny model, offload's freed GPU memory, and the loss kernel against megatron's on the GPU, as one
# table (bench/gpu_smoke.py, < 8 min). Never part of `make test`. Its venv sees the system's torch; everything else
# installs from ./wheels, which `make wheelhouse` fills on a machine with network.
gpu-smoke:
	$(PYTHON) -m venv --system-site-packages $(VENV)-gpu
	$(VENV)-gpu/bin/pip install -q --no-index --find-links wheels --no-deps -r wheels/requirements.txt
	$(VENV)-gpu/bin/pip install -q --no-index --no-deps --no-build-isolation --use-pep517 -e .
	$(VENV)-gpu/bin/python bench/gpu_smoke.py

# What the device image lacks (bench/gpu_smoke.py: DEVICE_IMAGE_PACKAGES), at the Python 3.12 leg's versions, as
# wheels for Python 3.12 on x86-64: megatron-core 0.19, omegaconf, math-verify and theirs. A device call carries at most
# 64 MiB with the working tree; tests/test_wheelhouse.py fails past 60 MiB.
WHEEL_PLATFORM ?= --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
WHEELS ?= wheels
wheelhouse: install-mcore019
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(VENV019)/bin/python bench/gpu_smoke.py --print-requirements > $(WHEELS)/requirements.txt
	$(VENV019)/bin/python -m pip download -q --no-deps --only-binary=:all: $(WHEEL_PLATFORM) -d $(WHEELS) \
		-r $(WHEELS)/requirements.txt
	@du -sh $(WHEELS) | awk '{print "wheelhouse: " $$1 " in $(WHEELS)/"}'
