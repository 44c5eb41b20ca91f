"""The gRPC code generated from ``proto/`` (by grpcio-tools, never by hand).

``make`` generates it; :func:`ensure` regenerates it whenever a ``.proto``
file is newer than what was generated (a stamp file records the hash of the
sources), so a fresh checkout works even without ``make``.  The generated
modules live in ``tender_service/gen/`` (not committed).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent / "proto"
GEN_DIR = PACKAGE_DIR / "gen"
STAMP = GEN_DIR / ".sources.sha256"
_lock = threading.Lock()


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    return sorted(proto_dir.rglob("*.proto"))


def sources_hash(proto_dir: Path = PROTO_DIR) -> str:
    h = hashlib.sha256()
    for f in proto_files(proto_dir):
        h.update(str(f.relative_to(proto_dir)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def generate(out_root: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc; modules land in ``out_root/tender_service/gen/unifork/v1``."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [f"tender_service/gen/{f.relative_to(proto_dir)}" for f in proto_files(proto_dir)]
    args = ["protoc", f"-Itender_service/gen={proto_dir}", f"-I{include}",
            f"--python_out={out_root}", f"--grpc_python_out={out_root}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(files))
    return sorted((out_root / "tender_service" / "gen").rglob("*.py"))


def ensure() -> None:
    """Generate the gRPC modules if they are missing or stale."""
    want = sources_hash()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    with _lock:
        if STAMP.exists() and STAMP.read_text().strip() == want:
            return
        log.info("generating gRPC code from %s", PROTO_DIR)
        generate(PACKAGE_DIR.parent)
        STAMP.write_text(want + "\n")
        importlib.invalidate_caches()


def load(name: str):
    """(NAME_pb2, NAME_pb2_grpc) of proto/unifork/v1/NAME.proto, generated on first use."""
    ensure()
    pb2 = importlib.import_module(f"tender_service.gen.unifork.v1.{name}_pb2")
    grpc_mod = importlib.import_module(f"tender_service.gen.unifork.v1.{name}_pb2_grpc")
    return pb2, grpc_mod


def peer():
    return load("peer")


def tender():
    return load("tender")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ensure()
    sys.exit(0)
