# launcher: `make demo` (the main job) and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DATA_DIR ?= data/digits
# The venv's Python: a 3.12 or 3.13 where the machine has one (CPython before 3.11.10 can hang a
# DataLoader worker as it forks: docs/known-problems.md#worker-hangs-at-fork), else python3;
# `make PYTHON=...` overrides.
PYTHON ?= $(shell sh scripts/find_python.sh)

# A second venv with the oldest versions pyproject.toml allows (uv's lowest-direct resolution:
# torch 2.7.0, torchvision 0.22.0, accelerate 1.1.0, wandb 0.19.5, numpy 1.26, ...):
# `make test-lowest` keeps those lower bounds true.
LOWEST ?= .venv-lowest

# moto's S3 server, which the remote-shard tests read from, in a venv of its own: moto needs boto3,
# and where boto3 is installed every `import accelerate` imports it (Accelerate's SageMaker config),
# about a second more in each of the hundreds of processes the suite starts.
MOTO ?= .venv-moto

.PHONY: setup demo lint test test-fast test-lowest bench clean

# torch and torchvision are resolved together from the registry by uv (a CPU-only torch wheel
# from a local find-links would break torchvision's compiled ops). The stamp makes a second
# `make setup` with nothing changed take milliseconds. --compile-bytecode writes every package's
# .pyc once: where PYTHONDONTWRITEBYTECODE is set (as on CI's machines) Python would otherwise
# compile torch and torchvision again in every process, about 15 s per start.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -e '.[dev]'
	touch $@

$(DATA_DIR)/.built: scripts/make_demo_data.py | setup
	$(PY) scripts/make_demo_data.py --out $(DATA_DIR)
	touch $@

# Pretrain a ResNet-18 on digits 0-4, then fine-tune it on all ten digits with a frozen
# stem and early stages, offline wandb, and print where everything went; then evaluate the
# fine-tuned model and predict a few held-out images from the ImageFolder copy of the digits.
demo: setup $(DATA_DIR)/.built
	rm -rf $(DEMO_DIR)
	$(PY) -m launcher recipes/resnet_pretrain --output_dir=$(DEMO_DIR)/pretrain --data_dir=$(DATA_DIR)
	$(PY) -m launcher recipes/resnet_finetune --output_dir=$(DEMO_DIR)/finetune --data_dir=$(DATA_DIR) \
		--weights=$(DEMO_DIR)/pretrain
	$(PY) -m launcher report $(DEMO_DIR)/pretrain $(DEMO_DIR)/finetune --out=$(DEMO_DIR)/report.html
	$(PY) -m launcher evaluate recipes/resnet_finetune --checkpoint=$(DEMO_DIR)/finetune --data_dir=$(DATA_DIR)
	$(PY) -m launcher predict recipes/resnet_finetune --checkpoint=$(DEMO_DIR)/finetune --data_dir=$(DATA_DIR) \
		--top_k=3 $(DATA_DIR)/folder/val/7

# Three pytest workers (pytest-xdist), each taking whole test files so that a file's shared runs
# (module fixtures) and the Slurm cluster stay in one process: much of an end-to-end test is one
# core importing torch or a process waiting on another, so on 2 cores a third worker fills the gaps.
PYTEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

$(MOTO)/.installed: | setup
	test -x $(MOTO)/bin/python || $(PYTHON) -m venv $(MOTO)
	$(VENV)/bin/uv pip install --python $(MOTO)/bin/python -q 'moto[server]>=5.0'
	touch $@

# ruff, configured in pyproject.toml: the lint rules, then the formatting (`ruff format .` rewrites
# it, `ruff check --fix .` fixes what it can). `make test` runs it first, so CI refuses either.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint $(MOTO)/.installed
	$(PY) -m pytest $(PYTEST_PARALLEL)

# The unit tier (tests/unit): no training run, no subprocess of the launcher; under 2 minutes.
test-fast: setup $(MOTO)/.installed
	$(PY) -m pytest tests/unit

$(LOWEST)/.installed: pyproject.toml | setup
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(VENV)/bin/uv pip install --python $(LOWEST)/bin/python -q --compile-bytecode --resolution lowest-direct -e '.[dev]'
	touch $@

# The unit tests and the end-to-end tests marked `lowest`: those whose path depends on the
# versions installed (each mark says which: gloo shutdown, DDP and FSDP in torch 2.7, Accelerate 1.1's
# accumulation, checkpoint and tracker code, wandb 0.19.5 offline and resume, ...). The rest of
# the end-to-end tier exercises the launcher's own logic, which `make test` covers.
# wandb 0.19.5 has no `wandb leet`; the tests read its runs back with .venv's newer CLI. The checks
# of the repository's own text (the docs' links and blocks, the layout) depend on no version: left out.
REPO_TEXT_TESTS := $(addprefix --ignore=tests/unit/,test_docs_blocks.py test_docs_links.py test_layout.py)
test-lowest: $(LOWEST)/.installed $(MOTO)/.installed
	LAUNCHER_TEST_WANDB=$(abspath $(VENV))/bin/wandb $(LOWEST)/bin/python -m pytest $(PYTEST_PARALLEL) -m "not e2e or lowest" \
		$(REPO_TEXT_TESTS)

bench: setup
	$(PY) scripts/bench_overhead.py
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_ddp_cpu.py

clean:
	rm -rf runs data .pytest_cache
