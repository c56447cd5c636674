# Every workflow of the project is one target here; `make help` lists them.
# Extra Hydra overrides go in ARGS, e.g.  make train ARGS="cell=lstm dataset=text8 trainer.max_steps=1000"
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=
NPROC  ?= 2
# torchrun's rendezvous: one machine by default; multi-node e.g. "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB"
TORCHRUN_ARGS ?= --standalone
SWEEP  ?= convergence_cpu
RUNS   ?=
OUT    ?=
# the test files spread over every core (pytest-xdist); PYTEST_ARGS= runs them one after another
PYTEST_ARGS ?= -n auto --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help setup train train-ddp sweep tune plot report bench params sample dynamic-eval lint format test test-fast clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

setup: ## create .venv and install the package (editable) with exactly the tested versions
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,slurm]"

train: ## train one model (default: the paper's mLSTM on enwik8); ARGS = Hydra overrides
	$(PY) -m mlstm.cli.train $(ARGS)

train-ddp: ## train on NPROC processes per node with torchrun/DDP (multi-node: TORCHRUN_ARGS); ARGS = Hydra overrides
	$(VENV)/bin/torchrun $(TORCHRUN_ARGS) --nproc_per_node=$(NPROC) -m mlstm.cli.train $(ARGS)

sweep: ## Hydra multirun of a sweep config: make sweep SWEEP=convergence_cpu ARGS=...
	$(PY) -m mlstm.cli.train --multirun +sweep=$(SWEEP) $(ARGS)

tune: ## Optuna search of optim.lr and optim.grad_clip for one cell: make tune ARGS="+variant=lstm_1m dataset=text8_sample"
	$(PY) -m mlstm.cli.train --multirun +sweep=optuna_lr $(ARGS)

plot: ## convergence figures + summary.csv + report.md from run directories: make plot RUNS=multirun/... OUT=...
	$(PY) scripts/plot_convergence.py $(RUNS) $(if $(OUT),--out $(OUT)) $(ARGS)

bench: ## speed benchmark of cells (forward+backward+step); ARGS = script flags
	$(PY) scripts/bench.py $(ARGS)

params: ## print the parameter count of a config without training or data: make params ARGS="experiment=..."
	$(PY) -m mlstm.cli.params $(ARGS)

sample: ## generate text from a checkpoint: make sample ARGS="checkpoint=... prompt='...' length=500"
	$(PY) -m mlstm.cli.sample $(ARGS)

dynamic-eval: ## static and dynamic-evaluation bpc of a checkpoint: make dynamic-eval ARGS="checkpoint=..."
	$(PY) -m mlstm.cli.dynamic_eval $(ARGS)

lint: ## ruff: the lint rules and the formatting check (configured in pyproject.toml)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: ## rewrite the code into the project's style: ruff format, then ruff check --fix
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

test: lint ## lint, then the whole test suite on every core (what CI runs)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: ## the test suite without the tests marked slow (real trainings in subprocesses); about 2 minutes
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not slow" tests

clean: ## remove local outputs (not results/)
	rm -rf outputs multirun wandb .pytest_cache
