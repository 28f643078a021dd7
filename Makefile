# Two entry points for a fresh clone: `make demo` (segment the bundled volume) and `make test`.
# Both create .venv and install the project into it on first use.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c .ci/constraints.txt -e ".[test]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ultrasam demo

test: setup
	$(VENV)/bin/python -m pytest -q Testing
