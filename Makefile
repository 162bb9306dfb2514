# spinml-ray: `make demo` runs the offline example end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Offline and loopback-only by default: no model-hub lookups, every Ray port on 127.0.0.1.
export HF_HUB_OFFLINE ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-fast bench example clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	bash cluster/demo.sh

# The report's browser test drives Debian's Chromium; installed here when missing (as root, with apt-get),
# otherwise that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "make: Chromium is not installed and could not be (needs root and apt-get): the browser test will be skipped"

test: venv browser
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not cluster"

bench: venv
	$(BIN)/python bench/bench_leakage.py
	$(BIN)/python bench/bench_sanitize.py

example: venv
	$(BIN)/spinml example examples

# The SpinBench diffusion model, trained from scratch on the procedural public corpus (about an hour on
# a 2-core CPU); SPINBENCH_MODEL_ARGS overrides, e.g. "--seed 1 --unet-steps 2000".
.PHONY: spinbench-model spinbench
spinbench-model: venv
	$(BIN)/python -m spinbench.model build --out spinbench/weights $(SPINBENCH_MODEL_ARGS)

# The full SpinBench benchmark: the shipped model's state fidelity, then every configuration, alpha
# 0.25 and 0.5 at L2_L0, 5 seeds, the baselines, for each user seed (hours on a 2-core CPU); results
# in spinml-data/spinbench/ (fidelity.json, user-N/results.md, user-N/accuracy.png).
SPINBENCH_USERS ?= 0 1 2
spinbench: venv
	mkdir -p spinml-data/spinbench
	$(BIN)/python -m spinbench.fidelity --out spinml-data/spinbench/fidelity.json
	for user in $(SPINBENCH_USERS); do \
	  $(BIN)/spinml spinbench run --user-seed $$user --alphas 0.25,0.5 --seeds 5 --baselines \
	    --out spinml-data/spinbench/user-$$user $(SPINBENCH_ARGS) || exit 1; \
	done

clean:
	rm -rf spinml-data .pytest_cache
