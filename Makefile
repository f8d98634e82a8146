# The two commands a newcomer needs: `make train` and `make test`. Everything installs itself.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.build/torch_extensions
DATA := data/default
ROWS ?= 1500000
RUN ?= default
SMOKE ?=

.PHONY: install train test lint format bench gpu-check doctor data study wheelhouse clean

install:
	@bash launch/install.sh

$(DATA)/.done: | install
	$(PY) -m pipeline.tools.synth --out $(DATA) --rows $(ROWS) --files 16 --seed 0
	@touch $@

data: $(DATA)/.done

train: install data
	bash launch/train.sh configs/default.toml --training.output_dir runs/$(RUN)

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	@mkdir -p bench/results
	$(PY) -m bench.run_all --out bench/results

gpu-check: install
	@mkdir -p bench/results
	$(PY) -m bench.gpu_check --json bench/results/gpu_check.json

# Offline wheels for an air-gapped host: HOST=host.json from `python -m launch.wheelhouse probe` on the
# host (default: this machine), parts of at most PART (default 60MiB) under OUT.
HOST ?=
OUT ?= dist/wheelhouse
PART ?= 60MiB
wheelhouse: install
	$(PY) -m launch.wheelhouse build $(if $(HOST),--host $(HOST),) --out $(OUT) --part-size $(PART)

doctor: install
	$(PY) -m launch.doctor

study: install
	$(PY) -m launch.study --config configs/study.toml $(if $(SMOKE),--smoke,)

clean:
	rm -rf runs bench/results .pytest_cache dist
