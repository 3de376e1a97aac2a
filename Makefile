# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m aspp_resunet.demo

# Two test processes: much of the suite is single-threaded (compiles, the CLI's subprocesses);
# on this 2-core machine 17 min 12 s -> 11 min 24 s, cold compile cache (497 tests).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev,bench]'
	$(PY) benchmarks/synthetic_vs_real.py
	$(PY) benchmarks/conv_impl.py
	$(PY) benchmarks/conv_impl.py --experimental --repeats=2 \
	    --shapes=96x64x64,64x128x128,32x256x256,16x512x512 \
	    --output=benchmarks/results/conv_impl_experimental.json
	$(PY) benchmarks/train_step_vs_torch.py --config=configs/demo.py --dtype=float32
	$(PY) benchmarks/train_step_vs_torch.py --config=configs/demo.py --dtype=bfloat16
	$(PY) benchmarks/inference.py --config=configs/demo.py
	$(PY) benchmarks/input_pipeline.py --config=configs/demo.py

clean:
	rm -rf $(VENV) runs data/synthetic
