"""Where unifork keeps its files: the guest sources in the repo and the build caches.

The image cache (``UNIFORK_CACHE_DIR``) and zig's cache (``UNIFORK_ZIG_CACHE_DIR``)
can be redirected separately: zig's cache holds the prebuilt musl (tens of
seconds to rebuild), the image cache only holds guest ELFs, so tests point the
latter at a temporary directory and keep sharing the former.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "UNIFORK_CACHE_DIR"
ZIG_CACHE_ENV = "UNIFORK_ZIG_CACHE_DIR"


def _default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/unifork`` or ``~/.cache/unifork``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "unifork"


def cache_dir() -> Path:
    """Root of unifork's caches (built images live under ``images/``)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else _default_cache_root()


def zig_cache_dir() -> Path:
    """zig's global+local cache: ``$UNIFORK_ZIG_CACHE_DIR``, else ``cache_dir()/zig``."""
    override = os.environ.get(ZIG_CACHE_ENV)
    return Path(override).expanduser() if override else cache_dir() / "zig"


def images_dir() -> Path:
    """Where built guest ELFs are cached."""
    return cache_dir() / "images"


def repo_root() -> Path:
    """The source tree (the package is installed editable, so this file lives in it)."""
    return Path(__file__).resolve().parents[2]


def guest_dir() -> Path:
    """``guest/``: the guest programs and the guest runtime."""
    path = repo_root() / "guest"
    if not path.is_dir():
        raise FileNotFoundError(
            f"guest sources not found at {path} (is unifork installed editable?)"
        )
    return path


def runtime_dir() -> Path:
    """``guest/runtime``: unifork_rt.c and unifork_hypercalls.h."""
    return guest_dir() / "runtime"


def programs_dir() -> Path:
    """``guest/programs``: one built-in program per ``.c`` file."""
    return guest_dir() / "programs"
