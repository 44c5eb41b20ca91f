"""Where unifork keeps its files: the guest sources (source tree or wheel) and the caches.

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


#: the package (``tender_service/``), wherever it is installed
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_root() -> Path | None:
    """The source tree when the package runs from one (an editable install), else None."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None


def shipped_dir(name: str) -> Path:
    """A top-level folder of the repository (``guest``, ``proto``) that a wheel ships as data.

    In a source tree it is ``NAME/`` beside the package (the user's layout); a wheel
    carries a copy at ``tender_service/NAME/`` (setup.py's build step).
    """
    root = source_root()
    candidates = [PACKAGE_DIR / name] + ([root / name] if root else [])
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"{name}/ not found (looked in {', '.join(map(str, candidates))}): "
        "install unifork from its source tree or from a wheel built by setup.py"
    )


def guest_dir() -> Path:
    """``guest/``: the guest programs and the guest runtime."""
    return shipped_dir("guest")


def runtime_dir() -> Path:
    """``guest/runtime``: unifork_rt.c and unifork_hypercalls.h."""
    return guest_dir() / "runtime"


def programs_dir() -> Path:
    """``guest/programs``: one built-in program per ``.c`` file."""
    return guest_dir() / "programs"
