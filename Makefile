# make install | test | lint | demo | demo-gae | gpu-smoke | wheelhouse. Everything runs inside ./.venv (gpu-smoke: ./.venv-gpu).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test lint demo demo-gae clean gpu-smoke wheelhouse

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

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS) tests

lint: install
	$(PY) -m ruff check megatron_sapo tools tests bench recipes

clean:
	rm -rf $(VENV) $(VENV)-gpu build *.egg-info

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
	$(VENV)-gpu/bin/pip install -q --no-index --no-deps --no-build-isolation -e .
	$(VENV)-gpu/bin/python bench/gpu_smoke.py

# megatron-core and the package's runtime dependencies outside torch's own, at this venv's versions. For a GPU
# machine with another Python, pass e.g. WHEEL_PLATFORM="--python-version 3.12 --platform manylinux2014_x86_64".
WHEEL_PLATFORM ?=
wheelhouse: install
	mkdir -p wheels
	$(PY) bench/gpu_smoke.py --print-requirements > wheels/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: $(WHEEL_PLATFORM) -d wheels -r wheels/requirements.txt
