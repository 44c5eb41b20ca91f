"""Throwaway TLS certificates for tests, made with the openssl CLI at test time.

``make_ca(dir, name)`` makes a CA; ``make_cert(ca, dir, name, ips)`` a
certificate it signs for both server and client use, with the given IP
addresses as subjectAltName.  Nothing here is ever committed: every key is
made in a temporary directory of the test.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(
        ["openssl", *args], check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL
    )


def need_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")


def make_ca(directory: Path, name: str = "ca") -> Cert:
    need_openssl()
    c = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req",
        "-x509",
        *KEY,
        "-keyout",
        str(c.key),
        "-out",
        str(c.cert),
        "-days",
        "1",
        "-subj",
        f"/CN=unifork test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return c


def make_cert(ca: Cert, directory: Path, name: str, ips: tuple[str, ...] = ("127.0.0.1",)) -> Cert:
    c = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=" + ",".join(f"IP:{ip}" for ip in ips) + "\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("req", *KEY, "-keyout", str(c.key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-CAcreateserial",
        "-out",
        str(c.cert),
        "-days",
        "1",
        "-extfile",
        str(ext),
    )
    return c
