# Two set-up-free entry points: `make demo` and `make test`.
# A CPU build of torch is installed first (pinned, quick); GPU users who already
# have torch in .venv keep theirs: the install step never replaces an importable torch.
PY := .venv/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: venv install demo test lint clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: .venv/.installed

# the embedded demo into runs/demo; a second `make demo` is refused (runs/demo holds a run):
# continue it with `.venv/bin/nanoseek train --resume`, or delete runs/demo first
demo: install
	.venv/bin/nanoseek train

test: install
	$(PY) -m ruff check nanoseek tests bench
	$(PY) -m pytest -q -x --durations=15

lint: install
	$(PY) -m ruff check nanoseek tests bench

clean:
	rm -rf .venv runs
