# soarbench: the two commands of a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast base clean perf perf-train gpu-check

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pinned torch 2.13.0 / torchvision 0.28.0: unpinned, pip would pull a multi-GB CUDA torch
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	# `from diffusers import ...` without `import soarbench` first: a .pth hook (see soarbench/_site_hook.py)
	$(BIN)/python -m soarbench._site_hook
	touch $(STAMP)

install: $(STAMP)

# SFT and SOAR from the committed shapes base under one budget, evaluated with the base on the test split, then the report
demo: $(STAMP)
	$(BIN)/soarbench run benchmarks/shapes/experiment.toml --out runs/shapes
	@echo "report: reports/shapes/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist worksteal

# the lane without the tiny model (unit tests, closed forms, reference implementations): what a quick edit needs
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist worksteal -m "not model"

# re-create the committed base model from its recipe (long on a CPU; pass DEVICE=cuda on a GPU)
DEVICE ?= auto
base: $(STAMP)
	$(BIN)/python benchmarks/shapes/make_base.py --recipe benchmarks/shapes/base_recipe.toml \
		--out benchmarks/shapes/base --device $(DEVICE)

# images/s of every scorer (real architectures; random weights where reward_ckpts/ lacks the published ones)
# and ClipScore against torchmetrics' CLIPScore on the same model; see benchmarks/perf/README.md
perf: $(STAMP)
	$(BIN)/python benchmarks/perf/scorers.py --scale real --images 16 --batch-sizes 1,8 --device $(DEVICE) \
		--json runs/perf/scorers.json

# the harness's SFT step over a bare diffusers loop, and SOAR's step over SFT's beside the budget's ratio
perf-train: $(STAMP)
	$(BIN)/python benchmarks/perf/train_step.py --device $(DEVICE) --json runs/perf/train_step.json

# every figure owed at scale on one lent H100/H200 in one command (~9 min): harness/bare, MFU, memory, the
# micro-batch sweep, evaluation images/s, the DDP/ZeRO-2/ZeRO-3/FSDP2 smoke runs; benchmarks/perf/gpu_check.py
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/perf/gpu_check.py --out runs/perf/gpu_check

clean:
	rm -rf runs .cache reports/shapes
