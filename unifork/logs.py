"""How ``unifork`` logs: short lines for commands a person runs; for ``serve``, a
UTC timestamp on every line, or one JSON object a line (``--log-format json``) for
a log collector.

The tender's child processes send their records home (instance/childproc.py), so
these handlers format theirs too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

SERVE_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message.

    python-json-logger does the same; these few lines keep it from being a dependency
    of every install for one flag of one command.
    """

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _timestamped() -> logging.Formatter:
    f = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
    )
    f.converter = time.gmtime
    return f


def setup(verbose: int, serve_format: str | None = None) -> None:
    """``serve_format``: None for a command a person runs, else one of SERVE_FORMATS
    (the tender logs INFO unless -v asks for more)."""
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    if serve_format is None:
        handler.setFormatter(logging.Formatter("unifork: %(levelname)s: %(message)s"))
    else:
        level = min(level, logging.INFO)
        handler.setFormatter(JsonFormatter() if serve_format == "json" else _timestamped())
    logging.basicConfig(level=level, handlers=[handler])
