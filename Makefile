# Two entry points for a fresh clone: `make demo` (segment the bundled volume) and `make test`.
# Both create .venv and install the project into it on first use. `make test` also runs the
# torch-free suite under Python 3.9 and 3.12 (`make test-compat`, Slicer 5.8's and 5.10+'s Pythons),
# then the whole suite; each pytest run prints its own summary, and any failure fails the target.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c .ci/constraints.txt -e ".[test]"
	touch $@

.PHONY: setup demo test test-compat
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ultrasam demo

test: setup
	@status=0; .ci/test-compat || status=1; $(VENV)/bin/python -m pytest -q Testing || status=1; exit $$status

test-compat:
	.ci/test-compat
