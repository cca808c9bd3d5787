# Two commands matter: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/shapes
RUN    ?= runs/tiny
# tested versions; `make test CONSTRAINTS= VENV=.venv-latest` tries the newest releases in a separate venv
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# extra recipe overrides for `make train`, e.g. TRAIN_ARGS="seed=1"
TRAIN_ARGS ?=
export PYTHONUNBUFFERED := 1

.PHONY: install demo test data train eval clean

install: $(VENV)/.installed

# torch is pinned first: this machine has the 2.13.0 CPU build locally; an unpinned torch would
# pull several GB of CUDA packages. llama-cpp-python ([gguf]) builds from source once, then pip
# reuses the cached wheel.
$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade $(PIN) pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q $(PIN) -e ".[all]"
	touch $@

data: install
	$(BIN)/python train/make_data.py --out $(DATA)

train: install
	$(BIN)/python train/train.py --recipe train/configs/tiny.yaml output_dir=$(RUN) \
		stages.0.data=$(DATA)/captions.json stages.1.data=$(DATA)/train.json $(TRAIN_ARGS)

eval: install
	$(BIN)/edgevlm eval --model $(RUN)/final --data $(DATA) --split test --json $(RUN)/eval_test.json

# data, train and eval in that order (a sub-make, so `make -j demo` cannot reorder them)
demo: install
	$(MAKE) --no-print-directory data train eval
	$(BIN)/edgevlm ask --model $(RUN)/final --image $(DATA)/images/test_000000.png \
		--prompt "How many shapes are there?" --stream
	$(BIN)/python benchmarks/run.py --matrix smoke --out $(RUN)/bench/smoke.jsonl --no-resume
	$(BIN)/python benchmarks/report.py $(RUN)/bench/smoke.jsonl --out report/
	@echo "data: $(DATA)  model: $(RUN)/final  eval: $(RUN)/eval_test.json  benchmark report: report/report.md"

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(RUN) $(DATA)
