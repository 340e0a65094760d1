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

# The R1-Zero story on the CPU: pretraining into runs/demo on a corpus without R1-template documents
# (--data.r1_share 0: like R1-Zero's base, it never saw the <think>/<answer> prompt; reused when it is
# already there: delete runs/demo to pretrain again), then GRPO with the R1-Zero prompt from its latest
# checkpoint into runs/demo-rl (started over each time), with held-out accuracy before and after.
demo: install
	@if [ -d runs/demo/checkpoints ]; then \
	  $(PY) -c "import json, sys; s = json.load(open('runs/demo/run.json')).get('config', {}).get('data', {}).get('r1_share'); \
	sys.exit(0 if s == 0 else f'make demo: runs/demo was pretrained with --data.r1_share {s}, but the R1-Zero demo \
	starts from a base that never saw the R1 template (--data.r1_share 0); move or delete runs/demo and run make demo again')" \
	  && echo "make demo: runs/demo holds a pretrained run; reusing it (delete runs/demo to pretrain again)"; \
	else .venv/bin/nanoseek train --data.r1_share 0; fi
	rm -rf runs/demo-rl
	.venv/bin/nanoseek rl --preset demo

test: install
	$(PY) -m ruff check nanoseek tests bench
	$(PY) -m pytest -q -x --durations=15

lint: install
	$(PY) -m ruff check nanoseek tests bench

clean:
	rm -rf .venv runs
