"""Third-party programs for the tests: ``tender_service.toolchain.thirdparty`` (dash from
Debian's sources, our small tools), the same builds ``unifork compare`` runs.

``python tests/thirdparty.py`` builds them (``make thirdparty``) and prints their paths.
"""

from __future__ import annotations

import logging
import sys

from tender_service.toolchain.thirdparty import Unavailable, dash, mini_httpd, tools

__all__ = ["Unavailable", "dash", "main", "mini_httpd", "tools"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(dash())
    except Unavailable as e:
        print(f"thirdparty: dash unavailable: {e}", file=sys.stderr)
        return 1
    try:
        print(mini_httpd())
    except Unavailable as e:
        print(f"thirdparty: mini_httpd unavailable: {e}", file=sys.stderr)
        return 1
    for path in tools().values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
