"""The wheel's build step (everything else is in pyproject.toml).

An installed unifork needs what the source tree keeps beside the package: the
guest sources (``guest/``, compiled with zig when an image is first used) and
the protos (``proto/``), plus the gRPC modules generated from them.  A wheel
carries copies of both folders inside the package (``tender_service/guest``,
``tender_service/proto``; see ``toolchain/paths.py:shipped_dir``) and the
modules generated here, at build time, with grpcio-tools (a build requirement),
so installing it needs neither grpcio-tools nor a source tree.  An editable
install uses the source tree's folders and ``make proto`` instead.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: top-level folders copied into the built package
SHIPPED = ("guest", "proto")


class BuildPyWithData(build_py):
    """build_py, then the shipped folders and the generated gRPC modules into build_lib."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the source tree's guest/ and proto/ are used in place
        sys.path.insert(0, str(ROOT))  # the build backend does not put the tree on sys.path
        from tender_service import protos  # stdlib-only at import; grpc_tools when generating

        pkg = Path(self.build_lib) / "tender_service"
        for name in (*SHIPPED, "gen"):  # nothing left over from an earlier build
            shutil.rmtree(pkg / name, ignore_errors=True)
        for name in SHIPPED:
            shutil.copytree(ROOT / name, pkg / name)
        generated = protos.generate(Path(self.build_lib), ROOT / "proto")
        self.announce(f"generated {len(generated)} gRPC modules into {pkg / 'gen'}", level=2)


setup(cmdclass={"build_py": BuildPyWithData})
