# unifork: `make run` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UNIFORK := $(VENV)/bin/unifork
STAMP := $(VENV)/.installed
GEN_STAMP := tender_service/gen/.sources.sha256

.PHONY: run test test-all setup proto images thirdparty lint docs clean

# editable, with every extra: the tests draw plots and `make proto` runs grpcio-tools
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,plots,gen]'
	touch $(STAMP)

setup: $(STAMP)

# the gRPC code, generated from proto/ into tender_service/gen/ (never edited by hand)
# whenever a .proto file changes (a wheel is built with it: setup.py)
$(GEN_STAMP): $(wildcard proto/*/*/*.proto) $(STAMP)
	$(PY) -m tender_service.protos

proto: $(GEN_STAMP)

# guest images (and, the first time, zig's musl build) into ~/.cache/unifork
images: proto
	$(UNIFORK) images --build

# the real-program workloads need dash (thirdparty); without it they are skipped, saying why
run: images thirdparty
	$(UNIFORK) compare --quick

# third-party programs for the tests (dash from Debian's sources, built with `unifork cc`)
# into ~/.cache/unifork/thirdparty: once per machine and toolchain, so CI caches them; a
# machine that cannot fetch them still runs the tests (those that need them skip, saying why)
thirdparty: images
	-$(PY) tests/thirdparty.py

test: images thirdparty
	$(PY) -m pytest -q -ra -p no:cacheprovider

# the full set: test plus the tests marked slow (more real-program cases)
test-all: images thirdparty
	$(PY) -m pytest -q -ra -p no:cacheprovider --slow

# ruff (with a complexity ceiling) and mypy (its files and settings: pyproject.toml);
# mypy reads the generated gRPC modules, hence proto
lint: proto
	$(VENV)/bin/ruff check unifork tender_service comparison tests setup.py
	$(VENV)/bin/ruff format --check unifork tender_service comparison tests setup.py
	$(VENV)/bin/mypy

docs: setup
	$(UNIFORK) syscalls --markdown > docs/syscalls.md

clean:
	rm -rf $(VENV) build *.egg-info
