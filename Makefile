# make install | test | lint | demo. Everything runs inside ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test lint demo clean

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
	rm -rf $(VENV) build *.egg-info

# The CPU demo: tiny Qwen3-MoE, warm start, conversion, SAPO under torchrun (EP=2), metrics plot (~5 min).
demo: install
	bash recipes/tiny_moe/demo.sh
