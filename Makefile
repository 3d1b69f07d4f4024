PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,service,demo,tinker]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m jaxreg demo

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxreg tests benchmarks examples
	$(VENV)/bin/ruff format --check jaxreg tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy jaxreg

bench: $(STAMP)
	$(PY) -m benchmarks.compose_bench
	$(PY) -m benchmarks.batch_bench
	$(PY) -m benchmarks.service_bench
	$(PY) -m benchmarks.remote_bench
	$(PY) -m benchmarks.aggregators_bench
	$(PY) -m benchmarks.host_bench
	$(PY) -m benchmarks.grad_space_bench
	$(PY) -m benchmarks.param_diagnostics_bench
	$(PY) -m benchmarks.aggregators_accuracy
	$(PY) -m benchmarks.tinker_bench
	$(PY) -m benchmarks.service_limits_bench
	$(PY) -m benchmarks.service_stall_bench
	$(PY) -m benchmarks.service_load_bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info runs jaxreg-states
