# `make test` and `make demo` set up .venv on first use (torch pinned to the CPU build) and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: test test-interop test-plain-install demo lint clean

# The demo needs the package and its search extra (it indexes what it trained); the tests
# need every extra and the test tools.
$(BIN)/threetowers: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that no dependency can pull an unpinned (CUDA) build.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[search]" $(TORCH)
	touch $@

$(VENV)/.extras: $(BIN)/threetowers
	$(BIN)/pip install --quiet -e ".[all,test]" $(TORCH)
	touch $@

test: $(VENV)/.extras
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q
	$(BIN)/ruff check src tests

# Exports tiny runs and loads them in OpenCLIP, which lives in its own environment
# (.venv-interop, built once): see tests/interop.
INTEROP := .venv-interop
$(INTEROP)/.built: tests/interop/build_env.sh
	bash tests/interop/build_env.sh $(INTEROP)
	touch $@

test-interop: $(VENV)/.extras $(INTEROP)/.built
	HF_HUB_OFFLINE=1 THREETOWERS_INTEROP_PYTHON=$(INTEROP)/bin/python $(BIN)/pytest -q -m interop

# A fresh environment with no extras: trains the tiny preset, pulls no extra's package, and
# `serve` names the extra it needs.
test-plain-install:
	bash tests/install/plain_install.sh .venv-plain

# Trains (or resumes, or reprints) the demo, then indexes the world's test images for
# `threetowers serve runs/demo/index`.
demo: $(BIN)/threetowers
	$(BIN)/threetowers train configs/demo.yaml
	$(BIN)/threetowers index runs/demo --data worlds/default/retrieval/dataset_world.json \
		--out runs/demo/index

lint: $(VENV)/.extras
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(INTEROP) .venv-plain build *.egg-info src/*.egg-info
