"""Checks of command-line values that argparse's types cannot make (a file is read,
a target has a port), and the one error they raise.

Kept free of heavy imports: ``unifork run`` imports this module too.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(Exception):
    """A file or address named on the command line that cannot be used: the CLI prints
    ``unifork: <message>`` and exits 2."""


def check_target(text: str) -> str:
    """``text`` if it is HOST:PORT (or a ``unix:`` address): gRPC would dial a target
    without a port at 443, which is never a tender."""
    if text.startswith(("unix:", "unix-abstract:")):
        return text
    host, sep, port = text.rpartition(":")
    bare_v6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not sep or not host or bare_v6 or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"target {text!r}: not HOST:PORT (a port is required; "
            "an IPv6 address goes in brackets: [::1]:7700)"
        )
    return text


def check_files(a: argparse.Namespace, *flags: str) -> None:
    """Each file named by ``flags`` (``--token-file``, ``--tls-ca``, ...) can be read;
    a token file also holds a usable token."""
    from tender_service.service.auth import read_token

    for flag in flags:
        path = getattr(a, flag.lstrip("-").replace("-", "_"), None)
        if not path:
            continue
        try:
            if flag.endswith("token-file"):
                read_token(path)
            else:
                Path(path).open("rb").close()
        except OSError as e:
            raise UsageError(f"{flag} {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
