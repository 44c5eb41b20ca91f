# unifork: `make run` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UNIFORK := $(VENV)/bin/unifork
STAMP := $(VENV)/.installed

.PHONY: run test setup proto images lint docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# the gRPC code, generated from proto/ into tender_service/gen/ (never edited by hand)
proto: setup
	$(PY) -m tender_service.protos

# guest images (and, the first time, zig's musl build) into ~/.cache/unifork
images: proto
	$(UNIFORK) images --build

run: images
	$(UNIFORK) compare --quick

test: images
	$(PY) -m pytest -q -ra -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check unifork tender_service comparison tests

docs: setup
	$(UNIFORK) syscalls --markdown > docs/syscalls.md

clean:
	rm -rf $(VENV) build *.egg-info
