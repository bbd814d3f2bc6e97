# Two entry points: `make run` (the main job on the built-in default) and `make test`.
# Both create .venv and install the project on first use. CPU machines pin torch through
# constraints-cpu.txt; on a GPU machine run `make CONSTRAINTS= run` to get the CUDA build.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PYTEST_ARGS ?=

.PHONY: install run generate test bench

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(PIP_CONSTRAINT_FLAG) -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/kvserve serve

generate: install
	$(VENV)/bin/kvserve generate --prompt "The capital of France is" --prompt "Once upon a time"

# The `ray up` test (tests/test_ray_up.py; root, sshd, rsync, nc) runs last, in a pytest of its own.
test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	KVSERVE_RAY_UP_TEST=1 $(PYTHON) -m pytest $(PYTEST_ARGS) tests/test_ray_up.py

bench: install
	$(VENV)/bin/kvserve bench engine
