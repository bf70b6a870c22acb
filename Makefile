# `make demo` and `make test` work on a fresh machine with only Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the venv has none; override e.g. TORCH_SPEC="torch==2.6.0".
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m fastlora_core demo --out demo-output

# pytest: two worker processes (pytest-xdist), each test file kept whole in one of them: 6.5-7.5 instead of
# ~10 min on two cores; more workers would multiply the compile processes each one starts.
test: venv
	$(PY) -m ruff check .
	$(PY) -m mypy  # settings and files: [tool.mypy] in pyproject.toml
	$(PY) -m pytest -q -n auto --maxprocesses 2 --dist loadfile

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf demo-output .pytest_cache
