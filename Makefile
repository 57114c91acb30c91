# Two commands do everything on a fresh machine: `make demo` and `make test` (each sets itself up).
VENV := .venv
SETUP := $(VENV)/.lopa-setup

.PHONY: demo test setup clean

$(SETUP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(SETUP)

demo: $(SETUP)
	$(VENV)/bin/lopa demo

test: $(SETUP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
