# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# GPU clusters override the torch wheel: `make install TORCH_SPEC="torch==2.6.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO ?= full
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# The stamp is keyed on pyproject.toml and the torch spec: a second `make install` is a no-op.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-10)-$(shell echo '$(TORCH_SPEC)' | sha1sum | cut -c1-6)

export WANDB_SILENT ?= true
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/varedit-lab demo --mode $(DEMO)

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
