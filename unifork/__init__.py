"""unifork: the command line above the library and the harness.

The layers, lowest first: ``tender_service`` (the kernel, fork strategies and
the gRPC service: the library), ``comparison`` (the harness, which uses the
library) and ``unifork`` (the command line, which uses both).  No package
imports one above it; tests/test_layers.py checks it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unifork")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
