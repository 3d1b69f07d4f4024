PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test e2e docs demo lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,service,demo,tinker,docs,cookbook]'
	$(PY) -m pip install -q --no-deps tinker-cookbook==0.6.1  # see the cookbook extra
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not e2e"

# The long end-to-end runs (cookbook loops, multi-process training): .ci/run runs them too.
e2e: $(STAMP)
	$(PY) -m pytest -n 2 -m e2e tests; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5  # 5: none selected

# The documentation site (mkdocs.yml) into site/; --strict: any warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo: $(STAMP)
	$(PY) -m jaxreg demo

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxreg tests benchmarks examples
	$(VENV)/bin/ruff format --check jaxreg tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy jaxreg tests/typing
	$(VENV)/bin/pyright --pythonpath $(PY) tests/typing

BENCHMARKS := compose_bench batch_bench service_bench remote_bench aggregators_bench \
	host_bench grad_space_bench param_diagnostics_bench aggregators_accuracy tinker_bench \
	service_limits_bench service_stall_bench service_load_bench model_stage_bench regularize_bench \
	strategy_bench vmap_miscompile_bench memory_bench

bench: $(STAMP)
	for b in $(BENCHMARKS); do $(PY) -m benchmarks.$$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build site *.egg-info runs jaxreg-states
