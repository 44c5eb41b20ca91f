"""Images a tender can launch: the built-in guest programs and uploaded ELFs.

Uploads are checked on arrival (size limit, a static x86-64 ELF the loader
accepts) and stored content-addressed under the cache directory.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from tender_service.machine.elf import parse_elf
from tender_service.toolchain.images import build_image, builtin_programs
from tender_service.toolchain.paths import cache_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_UPLOAD = 64 << 20


@dataclass(frozen=True, slots=True)
class StoredImage:
    name: str
    path: Path
    size: int
    sha256: str
    builtin: bool


class ImageStore:
    def __init__(self, root: Path | None = None, max_upload: int = DEFAULT_MAX_UPLOAD) -> None:
        self.root = root or cache_dir() / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload = max_upload
        self._uploaded: dict[str, StoredImage] = {}
        self._builtin: dict[str, StoredImage] = {}
        self._lock = threading.Lock()

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME_RE.match(name))

    def add(self, name: str, data: bytes) -> StoredImage:
        """Store an uploaded image; ValueError (with the reason) if it is refused."""
        if not self.valid_name(name):
            raise ValueError("name: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
        if name in builtin_programs():
            raise ValueError(f"name: {name!r} is a built-in image")
        if len(data) > self.max_upload:
            raise OverflowError(f"image larger than {self.max_upload} bytes")
        parse_elf(data, name)  # ImageError (a ValueError) names what is wrong
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / f"{digest}.elf"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        img = StoredImage(name, path, len(data), digest, False)
        with self._lock:
            self._uploaded[name] = img
        return img

    def get(self, name: str) -> StoredImage | None:
        with self._lock:
            img = self._uploaded.get(name) or self._builtin.get(name)
        if img is not None:
            return img
        if name in builtin_programs():
            path = build_image(name)
            data = path.read_bytes()
            img = StoredImage(name, path, len(data), hashlib.sha256(data).hexdigest(), True)
            with self._lock:
                self._builtin[name] = img
            return img
        return None

    def list(self) -> list[StoredImage]:
        out = [img for name in sorted(builtin_programs()) if (img := self.get(name))]
        with self._lock:
            out += sorted(self._uploaded.values(), key=lambda i: i.name)
        return out
