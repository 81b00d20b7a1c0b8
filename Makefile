# Fresh machine to results: `make demo` (export + generate + time on the CPU), `make test`.
# Everything installs into .venv; nothing needs installing by hand.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/gpt2-engine
MODEL  ?= gpt2
ART    ?= artifacts/$(MODEL)-random

.PHONY: demo test test-slow bench tokenizer clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (a test/peer dependency), so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,hub,serve,ray]'
	touch $@

demo: $(VENV)/.installed
	@# Re-exported when missing or made by an older graph version (the engine's own caches do the same).
	@$(PY) -c 'import sys; from engine.artifact import is_current_export; sys.exit(not is_current_export("$(ART)"))' \
		|| $(CLI) export $(MODEL) --init random --out $(ART) --force
	$(CLI) generate $(ART) "The meaning of life is" --max-new-tokens 64 --seed 0 --timings

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -s -m slow

bench: $(VENV)/.installed
	$(CLI) bench --model $(MODEL) --init random --quick

tokenizer: $(VENV)/.installed
	$(PY) -m export.tokenizer

clean:
	rm -rf artifacts bench-results
