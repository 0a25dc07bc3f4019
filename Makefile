# make demo: install into .venv (once), then run the main job.
# make test: install into .venv (once), then run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps -e .  # the build backend warns about editable layouts
	touch $@

demo: install
	$(PY) demos/run_demo.py --out-dir results

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/bench_icl_inference.py
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_sb_cut.py
	$(PY) bench/bench_nnclr.py --batch-size 32 --steps 3
	$(PY) bench/bench_similarity.py --n 100000

clean:
	rm -rf results .pytest_cache *.egg-info
