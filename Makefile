# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
# `make bench` (same set-up) regenerates docs/performance.md's per-step breakdown;
# `make bench BENCH_LOSS=1` also prints the KD loss microbenchmark's table.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch where no CUDA driver is present; otherwise keep whatever pip resolves.
TORCH_SPEC := $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: demo test bench study install clean

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

$(VENV)/.megakd-study-installed: $(VENV)/.megakd-installed setup.py
	$(PY) -m pip install --quiet -e ".[study]"
	touch $@

# KD vs plain fine-tuning on CPU (about 20 minutes on 2 cores): rewrites docs/quality.md and
# docs/quality_validation_ce.png from runs/study/results.json.
study: $(VENV)/.megakd-study-installed
	$(PY) examples/cpu_study/study.py --output-dir runs/study
	$(PY) examples/cpu_study/report.py runs/study/results.json --markdown docs/quality.md \
	  --plot docs/quality_validation_ce.png

bench: install
	$(PY) tools/bench_step.py --write-docs
	if [ -n "$(BENCH_LOSS)" ]; then $(PY) tools/bench_kd_loss.py; fi

clean:
	rm -rf runs .pytest_cache
