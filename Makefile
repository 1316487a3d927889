# Two commands on a fresh machine: `make example` (the main job) and `make test`.
# Both create .venv on first use. torch is pinned to the build the suite is tested with.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.grape-installed

.PHONY: install test lint format example example-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	# LAION's clip_benchmark, the independent Recall@k reference in tests/test_eval.py;
	# --no-deps because its dataset dependencies are heavy and its metrics need none.
	$(BIN)/python -m pip install -q --no-deps "clip-benchmark==1.6.2"
	touch $(STAMP)

install: $(STAMP)

# Lint, format check, then the whole test suite (unit tests + doctests), offline.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The bundled example: builds the shapes world, trains its tiny CLIP and LLM, indexes,
# evaluates, trains rewriters with GRPO and writes examples/shapes/work/RESULTS.md.
example: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m examples.shapes.run

example-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m examples.shapes.run --quick --workdir /tmp/grape-example-quick

clean:
	rm -rf $(VENV) examples/shapes/work .pytest_cache .ruff_cache
