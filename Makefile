# Two entry points (see README): `make run` runs the main job, `make test` runs the whole suite.
# Both create the virtual environment first: the core, every backend under backends/ and every
# plugin under plugins/ installed editable, plus the CPU build of torch when there is no GPU.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DISTS := $(patsubst %/pyproject.toml,%,$(wildcard backends/*/pyproject.toml plugins/*/pyproject.toml))
MYPY_TARGETS := hicache $(filter-out %.egg-info,$(wildcard backends/*/hicache_* plugins/*/hicache_*))
export HYPOTHESIS_PROFILE ?= ci

.PHONY: venv run test lint typecheck pytest stress-test bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard backends/*/pyproject.toml plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A CUDA machine gets torch's default (CUDA) build; elsewhere the CPU build, which these
	# machines keep on local disk as 2.13.0 (a bare `pip install torch` pulls several GB of CUDA).
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q 'torch>=2.1'; \
	else \
		$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q 'torch==2.13.0'; \
	fi
	$(PIP) install -q -e '.[cache,test,plot]' $(foreach d,$(DISTS),-e ./$(d)[test])
	touch $@

run: venv
	$(VENV)/bin/hicache replay

test: venv lint typecheck pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy $(MYPY_TARGETS)

pytest: venv
	$(VENV)/bin/pytest -q

# Not part of `test`: every concurrency-sensitive test file (listed in the script) STRESS_COUNT
# times over while two busy processes load the cores. STRESS_FILES picks files or test ids.
STRESS_COUNT ?= 200
stress-test: venv
	STRESS_COUNT=$(STRESS_COUNT) PYTHON=$(PY) bash scripts/stress_test.sh $(STRESS_FILES)

bench: venv
	$(VENV)/bin/hicache bench storage --config configs/memory.yaml

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
