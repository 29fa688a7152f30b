# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cachegen-installed

.PHONY: setup run test test-unit model clean-venv

# Reinstall when the dependency list or the install script changes; otherwise skip in milliseconds.
$(STAMP): pyproject.toml deploy/install.sh
	bash deploy/install.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(VENV)/bin/cachegen model prepare

run: setup
	$(VENV)/bin/cachegen serve

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

clean-venv:
	rm -rf $(VENV)
