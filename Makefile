# Two commands matter: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/shapes
RUN    ?= runs/tiny
# tested versions; `make test CONSTRAINTS= VENV=.venv-latest` tries the newest releases in a separate venv
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Which torch build `make install` takes (PyPI's torch for x86-64 Linux is the CUDA build, several GB):
#   TORCH_INDEX=auto (default): a local torch wheel if pip finds one without an index (find-links,
#       as on the machine the constraints were made on), else on Linux the CPU build
#       ($(TORCH_CPU_INDEX)), else (macOS) PyPI's torch
#   TORCH_INDEX=https://download.pytorch.org/whl/cu126   a CUDA build (pick the cuXXX your driver runs)
#   TORCH_INDEX=   PyPI's default build
# A Jetson runs bundles with the lean device install instead (no torch; docs/jetson.md).
TORCH ?= torch==2.13.0
TORCH_INDEX ?= auto
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# extra recipe overrides for `make train`, e.g. TRAIN_ARGS="seed=1"
TRAIN_ARGS ?=
export PYTHONUNBUFFERED := 1
# llama.cpp (llama-cpp-python here, llama-mtmd-cli/llama-server in tests/llamacpp_tools.py) is built
# for this host but without Intel AMX: on a VM whose CPUID reports AMX that the hypervisor does not
# enable, ggml's AMX matmul dies with SIGILL (docs/int8-portability.md). Override to build differently.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64 amd64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)')

BUNDLES ?= bundles
IMAGE  := $(DATA)/images/test_000000.png
ASK    := "How many shapes are there?"

.PHONY: install demo test data train eval bundles clean arm64-env test-arm64

install: $(VENV)/.installed

# torch first, from the index TORCH_INDEX picks (above); llama-cpp-python ([export]) builds from
# source once, then pip reuses the cached wheel.
$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade $(PIN) pip setuptools wheel
	@index='$(TORCH_INDEX)'; \
	if [ "$$index" = auto ]; then \
		if $(BIN)/python -m pip install -q --dry-run --no-index --no-deps '$(TORCH)' >/dev/null 2>&1; then index=; \
		elif [ "$$(uname -s)" = Linux ]; then index='$(TORCH_CPU_INDEX)'; else index=; fi; \
	fi; \
	echo "$(TORCH) from $${index:-the configured indexes and local wheels}"; \
	$(BIN)/python -m pip install -q $${index:+--index-url $$index} '$(TORCH)'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q $(PIN) -e ".[all]"
	touch $@

data: install
	$(BIN)/python train/make_data.py --out $(DATA)

train: install
	$(BIN)/python train/train.py --recipe train/configs/tiny.yaml output_dir=$(RUN) \
		stages.0.data=$(DATA)/captions.json stages.1.data=$(DATA)/train.json $(TRAIN_ARGS)

eval: install
	$(BIN)/edgevlm eval --model $(RUN)/final --data $(DATA) --split test --json $(RUN)/eval_test.json

# the trained model as the two deployable bundles: ONNX int4 (ort backend) and GGUF q4_k_m (llama.cpp)
bundles: install
	$(BIN)/python export/to_onnx.py --model $(RUN)/final --quantize int4 --calib-data $(DATA)/train.json \
		--out $(BUNDLES)/tiny-onnx-int4
	$(BIN)/python export/to_gguf.py --model $(RUN)/final --quant q4_k_m --out $(BUNDLES)/tiny-gguf

# data, train, eval and bundles in that order (a sub-make, so `make -j demo` cannot reorder them),
# then one question answered by PyTorch and by both bundles on the torch-free runtime
demo: install
	$(MAKE) --no-print-directory data train eval bundles
	$(BIN)/edgevlm ask --model $(RUN)/final --image $(IMAGE) --prompt $(ASK) --stream
	$(BIN)/edgevlm run --bundle $(BUNDLES)/tiny-onnx-int4 --image $(IMAGE) --prompt $(ASK) --stream
	$(BIN)/edgevlm run --bundle $(BUNDLES)/tiny-gguf --image $(IMAGE) --prompt $(ASK) --stream
	$(BIN)/python benchmarks/run.py --matrix smoke --out $(RUN)/bench/smoke.jsonl --no-resume
	$(BIN)/python benchmarks/report.py $(RUN)/bench/smoke.jsonl --out report/
	@echo "data: $(DATA)  model: $(RUN)/final  eval: $(RUN)/eval_test.json  bundles: $(BUNDLES)/  benchmark report: report/report.md"
	@# a 4 s ShapesVQA clip whose circle changes colour every second, watched by the ONNX bundle: one JSON line per second
	$(BIN)/python -m edgevlm.train.data.shapes_video --out $(RUN)/watch.mp4 --item 5 --seconds 4 --fps 5 --hold 1
	$(BIN)/edgevlm watch --bundle $(BUNDLES)/tiny-onnx-int4 --source $(RUN)/watch.mp4 --prompt "What colour is the circle?" \
		--every 1 --max-new-tokens 8

test: install
	$(BIN)/python -m pytest tests

# Arm64 under qemu-user (docs/arm64.md): the environment (Debian qemu + arm64 Python, aarch64 wheels;
# no root) and llama.cpp cross-compiled for armv8-a and armv8.2-a+dotprod (needs, as root:
# apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu; ~15-20 min per level, cached)
arm64-env: install
	$(BIN)/python tests/arm64/build_env.py
	$(BIN)/python tests/arm64/cross_llamacpp.py

# every runtime kernel (ONNX fp32/fp16/int8 formats/int4, GGUF f16/q8_0/q4_k_m) on every Arm class
# vs x86, the damaged-bundle check and the on-target benchmark flow
test-arm64: arm64-env
	EDGEVLM_ARM_FULL=1 $(BIN)/python -m pytest tests/arm64 tests/test_arm64_smoke.py -s

clean:
	rm -rf $(RUN) $(DATA) $(BUNDLES)
