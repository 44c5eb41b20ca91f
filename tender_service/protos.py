"""The gRPC code generated from ``proto/`` (by grpcio-tools, never by hand).

It is generated at build time, never at import: building a wheel runs protoc
(setup.py; grpcio-tools is a build requirement, so an installed unifork does
not need it), and in a source tree ``make proto`` (``python -m
tender_service.protos``, which needs the ``gen`` extra) regenerates it when a
``.proto`` file changes.  A stamp file beside the modules records the hash of
the sources they came from, so :func:`ensure` can refuse stale or missing code
with the command that fixes it instead of serving an old schema.  The modules
live in ``tender_service/gen/`` (not committed).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import sys
from pathlib import Path

from tender_service.toolchain.paths import shipped_dir

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "gen"
STAMP_NAME = ".sources.sha256"
STAMP = GEN_DIR / STAMP_NAME


class GeneratedCodeError(RuntimeError):
    """The generated modules are missing or do not match ``proto/``."""


def proto_dir() -> Path:
    """``proto/`` in the source tree, or its copy inside an installed wheel."""
    return shipped_dir("proto")


def proto_files(root: Path | None = None) -> list[Path]:
    return sorted((root or proto_dir()).rglob("*.proto"))


def sources_hash(root: Path | None = None) -> str:
    root = root or proto_dir()
    h = hashlib.sha256()
    for f in proto_files(root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def generate(out_root: Path, root: Path | None = None) -> list[Path]:
    """Run protoc; modules (and the stamp) land in ``out_root/tender_service/gen/``."""
    import grpc_tools
    from grpc_tools import protoc

    root = root or proto_dir()
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [f"tender_service/gen/{f.relative_to(root)}" for f in proto_files(root)]
    args = [
        "protoc",
        f"-Itender_service/gen={root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(files))
    gen = out_root / "tender_service" / "gen"
    (gen / STAMP_NAME).write_text(sources_hash(root) + "\n")
    return sorted(gen.rglob("*.py"))


@functools.cache
def ensure() -> None:
    """Check (once per process) that the generated modules are there and match ``proto/``."""
    have = STAMP.read_text().strip() if STAMP.exists() else None
    if have == sources_hash():
        return
    state = "missing" if have is None else f"stale (older than {proto_dir()})"
    raise GeneratedCodeError(
        f"the gRPC code in {GEN_DIR} is {state}: run `make proto` or "
        "`python -m tender_service.protos` (needs the gen extra: pip install -e '.[gen]')"
    )


def load(name: str):
    """(NAME_pb2, NAME_pb2_grpc) of proto/unifork/v1/NAME.proto."""
    ensure()
    pb2 = importlib.import_module(f"tender_service.gen.unifork.v1.{name}_pb2")
    grpc_mod = importlib.import_module(f"tender_service.gen.unifork.v1.{name}_pb2_grpc")
    return pb2, grpc_mod


def peer():
    return load("peer")


def tender():
    return load("tender")


def main() -> int:
    """``python -m tender_service.protos``: regenerate the modules in place (``make proto``)."""
    logging.basicConfig(level=logging.INFO)
    log.info("generating gRPC code from %s", proto_dir())
    generate(PACKAGE_DIR.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
