# The two set-up commands of the README are `make run` and `make test`; both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint protos mlflow-server constraints bench bench-scale fuzz

# Reinstalls only when pyproject.toml or a compiled kernel changes, so a second `make run` starts in seconds.
$(STAMP): pyproject.toml setup.py server/_treeshap.c server/_forest.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing StreamFlow and its dependencies into $(VENV) (a few minutes on a fresh clone)..."
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off -e '.[dev]'  # a line per package: progress on a fresh clone
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/streamflow bootstrap
	exec $(BIN)/streamflow serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

# The suite runs in TEST_PROCESSES processes, a test file in one process (its module fixtures built once).
# One process took 21 min, 3 processes 10 to 12 min here (2026-12-01); 4 took 9 min 56 s once, and 14 min 34 s
# in a fresh clone with a test timing out. A fresh clone's whole `make test` used 24 CPU-minutes in 18.5
# minutes on a slow hour of 2026-12-02 and 13.6 in 9.6 minutes on a quiet one: the 2 cores, not waits, bound
# it now, so more processes would not help.
TEST_PROCESSES ?= 3
# buf checks the contract as a fresh clone has it (tests/test_contract.py proves each check can fail); promtool
# (Debian's `prometheus`) checks the alert rules in tests/test_operator_configs.py.
test: install lint
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code --path protos/streamflow
	$(BIN)/buf breaking --against protos/released/streamflow_serving_v1.image.yaml --exclude-imports
	command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)
	$(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadfile

# The wire properties of tests/test_wire_properties.py with many more examples than make test draws.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider tests/test_wire_properties.py

# Regenerates client/generated and protos/streamflow_serving_v1.binpb from protos/ (tests/test_contract.py fails
# when either is stale).
protos: install
	$(BIN)/python protos/generate.py

# Production profile: MLflow tracking server on MLFLOW_TRACKING_URI's address (default 127.0.0.1:5000) with a
# PostgreSQL backend store (created if missing) and served artifacts; returns once /health answers.
mlflow-server: install
	$(BIN)/python -m streamflow.mlflow_server

# Pins the Docker images to the versions of the tested venv (tests/test_deploy.py fails when it is stale).
constraints: install
	{ echo "# The tested environment, pinned: every image installs with these versions (-c)."; \
	  echo "# Regenerate after changing pyproject.toml: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable; } > deploy/constraints.txt

# StreamFlow against the seed-style REST service, `mlflow models serve` and the in-process floor, side by side
# (bench/run.py; its own home .streamflow-bench). h2load drives the load: Debian's nghttp2-client.
bench: install
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(BIN)/python -m bench.run

# The offline steps (materialize, training set, score-all) in this process and on a local Ray instance of 2 CPUs,
# at 100,000 and 1,000,000 users (bench/batch_scale.py; other sizes: make bench-scale SCALE_USERS=5000,20000;
# on PostgreSQL and Redis: make bench-scale SCALE_PROFILE=production).
SCALE_USERS ?= 100000,1000000
SCALE_PROFILE ?= embedded
bench-scale: install
	$(BIN)/python -m bench.batch_scale --users $(SCALE_USERS) --profile $(SCALE_PROFILE)
