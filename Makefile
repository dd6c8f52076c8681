# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: setup browser test test-fast demo lint bench gpu-wheels gpu-check clean

CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

setup: $(STAMP) browser

# The browser tests drive Debian's chromium through its chromedriver (tests/integration/browser.py);
# installed with apt-get when missing and run as root (CI), else named.
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get update -q && \
			apt-get install -y -q --no-install-recommends chromium chromium-driver; \
		else \
			echo "browser tests need chromium and chromedriver: as root," \
				"apt-get install --no-install-recommends chromium chromium-driver"; \
		fi; \
	fi

# torch first (pinned CPU/CUDA build), then img2dataset without its broken
# `dataclasses` pin, then the project with its real dependency list. Prefect's local
# database (PREFECT_HOME) is created here, once, rather than by the first `make demo`:
# its migrations took 14 s of a 2-core machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install --no-deps img2dataset==1.47.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/prefect server database upgrade --yes
	touch $(STAMP)

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The whole pipeline on the built-in demo profile (about 8 minutes on 2 CPU cores: README).
demo: $(STAMP)
	$(BIN)/segclip run --profile demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/data_stages.py --images 2000
	$(BIN)/python benchmarks/felzenszwalb.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/superpixel_links.py

# The GPU machine (CUDA PyTorch, Python 3.12, no registry, no .venv) lacks some of what
# benchmarks/gpu_check.py imports: fetch those wheels here, carry gpu_wheels/ along with
# the tree (64 MiB in all), then run `make gpu-check` there.
GPU_WHEELS := gpu_wheels
CARRY_LIMIT_BYTES := 67108864

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --no-deps -d $(GPU_WHEELS) -r benchmarks/gpu_wheels.txt
	@wheels=$$(cat $(GPU_WHEELS)/*.whl | wc -c); tree=$$(git ls-files -z | xargs -0 cat | wc -c); \
	echo "$(GPU_WHEELS): $$(ls $(GPU_WHEELS)/*.whl | wc -l) wheels, $$wheels bytes; with the tree $$((wheels + tree)) of $(CARRY_LIMIT_BYTES)"; \
	test $$((wheels + tree)) -le $(CARRY_LIMIT_BYTES)

# On the GPU machine: needs only python3 and gpu_wheels/ (ARGS go to the check).
gpu-check:
	sh benchmarks/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(GPU_WHEELS)
