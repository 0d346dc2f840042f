# Two commands do all set-up on a fresh machine:  make demo  |  make test
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-bf16 lint bench golden clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: a bare "torch" requirement would pull several GB of CUDA wheels on a CPU box.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## train + sweep three tiny-gpt2 configs on the bundled HH-RLHF sample, report
	$(VENV)/bin/dpolab demo

test: $(STAMP)  ## the whole suite (CPU, ~11 minutes on 2 cores)
	$(PY) -m pytest -q

# The CLI-level tests again with `dtype: auto` resolving to bf16, as on a CPU with AMX: every stage's
# bf16 path (record, evaluate, serve, export, sweep, resume) is exercised on any CPU.
BF16_TESTS = tests/sft tests/evaluate tests/hub/test_hub_export.py tests/test_relative_paths.py \
             tests/sweep/test_sweep_grid.py tests/dpo/test_trainer.py::test_cli_trains_from_a_config_with_overrides
test-bf16: $(STAMP)  ## the CLI-level tests with dtype auto -> bf16 (DPOLAB_AUTO_DTYPE=bf16)
	DPOLAB_AUTO_DTYPE=bf16 $(PY) -m pytest -q $(BF16_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)  ## speed benchmarks (minutes); results in BENCHMARKS.md
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_latency.py

golden: $(STAMP)  ## re-record the pinned golden losses (only after an intended change)
	$(PY) -m tests.dpo.golden

clean:
	rm -rf $(VENV) runs .pytest_cache
