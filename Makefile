# make demo: RL on the shipped Shapes model, held-out accuracy base -> trained (CPU, ~4 min).  make test: tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Without CUDA, install the CPU torch wheel first so nothing pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
# ... and the rest at the versions CI passed with (CONSTRAINTS= for the newest); a CUDA machine gets the loose ones.
CONSTRAINTS ?= constraints.txt
DEMO_DIR  ?= runs/demo

.PHONY: demo demo-tiny test lint install clean shapes-base shapes-base-full

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q -e ".[test]"; \
	else \
		$(PY) -m pip install -q "$(TORCH_CPU)" && \
		$(PY) -m pip install -q -e ".[test]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS)); \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m wan_grpo.tasks.shapes.demo --save_dir $(DEMO_DIR)

# The earlier demo: GRPO on the random tiny model with the brightness reward (about 2 minutes).
demo-tiny: $(STAMP)
	$(VENV)/bin/wan-grpo train --config configs/tiny-demo.yaml --save_dir $(DEMO_DIR)-tiny

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# Rebuild the shipped Shapes base model (src/wan_grpo/tasks/shapes/base/) on its own VAE: the text encoder and
# both experts, deterministic, ~40 min on 2 cores. shapes-base-full also retrains that VAE first (~30 min more).
SHAPES_BASE := src/wan_grpo/tasks/shapes/base
shapes-base: $(STAMP)
	$(PY) -m wan_grpo.tasks.shapes.build --vae_from $(SHAPES_BASE)

shapes-base-full: $(STAMP)
	$(PY) -m wan_grpo.tasks.shapes.build

clean:
	rm -rf $(VENV) runs
