# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch where no CUDA driver is present; otherwise keep whatever pip resolves.
TORCH_SPEC := $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: demo test install clean

$(VENV)/.megakd-installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.megakd-installed

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo_cpu.sh

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
