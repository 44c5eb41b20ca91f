"""unifork: the command line above the library and the harness.

The layers, lowest first: ``tender_service`` (the kernel, fork strategies and
the gRPC service: the library), ``comparison`` (the harness, which uses the
library) and ``unifork`` (the command line, which uses both).  No package
imports one above it; tests/test_layers.py checks it.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """``unifork.__version__``, the installed distribution's, looked up when asked:
    importlib.metadata takes ~40 ms to import, which every ``unifork run`` would pay."""
    if name != "__version__":
        raise AttributeError(f"module 'unifork' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unifork")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
