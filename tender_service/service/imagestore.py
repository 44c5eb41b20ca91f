"""Images a tender can launch: the built-in guest programs and uploaded ELFs.

Uploads are checked on arrival (size limit, a static x86-64 ELF the loader
accepts, or a baked image that passes every check of machine/rootfs.py) and stored content-addressed in a directory of this tender's own
under the cache directory (removed when the tender stops).  The bytes on disk
have a quota (``--max-image-store``).  ``delete`` removes a name at once; the
file goes when no name and no running instance uses it any more (an instance
keeps running from an image deleted under it, and its bytes count against the
quota until it ends).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tender_service.instance.budget import format_bytes
from tender_service.machine.rootfs import BootImage, load_image_file, parse_image
from tender_service.toolchain.images import build_image, builtin_programs
from tender_service.toolchain.paths import cache_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_UPLOAD = 64 << 20
DEFAULT_MAX_STORE = 512 << 20
STORE_FLAG = "--max-image-store"


class BuiltinImageError(ValueError):
    """A built-in image cannot be deleted (or replaced)."""


@dataclass(frozen=True, slots=True)
class StoredImage:
    name: str
    path: Path
    size: int
    sha256: str
    builtin: bool


class ImageStore:
    def __init__(
        self,
        root: Path | None = None,
        max_upload: int = DEFAULT_MAX_UPLOAD,
        max_store: int = DEFAULT_MAX_STORE,
    ) -> None:
        if max_store <= 0:
            raise ValueError(f"{STORE_FLAG} must be positive")
        parent = root or cache_dir() / "uploads"
        parent.mkdir(parents=True, exist_ok=True)
        # a directory of this tender's own: deleting a file never pulls it from another
        # tender that shares the cache directory
        self.root = Path(tempfile.mkdtemp(prefix="store-", dir=parent))
        self.max_upload = max_upload
        self.max_store = max_store
        self._uploaded: dict[str, StoredImage] = {}
        self._builtin: dict[str, StoredImage] = {}
        self._files: dict[str, int] = {}  # digest -> size of the file on disk
        self._pins: Counter[str] = Counter()  # digest -> running instances that use it
        self._lock = threading.Lock()

    def close(self) -> None:
        """Remove this tender's uploads (they live as long as the tender)."""
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def used(self) -> int:
        """Bytes of uploaded images on disk."""
        with self._lock:
            return sum(self._files.values())

    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        return (
            f"image store: {format_bytes(sum(self._files.values()))} in use of a "
            f"{format_bytes(self.max_store)} limit ({STORE_FLAG})"
        )

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME_RE.match(name))

    def add(self, name: str, data: bytes) -> StoredImage:
        """Store an uploaded image; ValueError (with the reason) if it is refused."""
        if not self.valid_name(name):
            raise ValueError("name: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
        if name in builtin_programs():
            raise BuiltinImageError(f"name: {name!r} is a built-in image")
        if len(data) > self.max_upload:
            raise OverflowError(f"image larger than {self.max_upload} bytes")
        parse_image(data, name)  # ImageError (a ValueError) names what is wrong
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / f"{digest}.elf"
        img = StoredImage(name, path, len(data), digest, False)
        with self._lock:  # one upload at a time decides and writes: the quota holds
            if digest not in self._files:
                used = sum(self._files.values())
                if used + len(data) > self.max_store:
                    raise OverflowError(
                        f"{self._state()}; this image needs "
                        f"{format_bytes(len(data))} more (DeleteImage frees)"
                    )
                tmp = path.with_suffix(f".tmp{threading.get_ident()}")
                tmp.write_bytes(data)
                tmp.replace(path)
                self._files[digest] = len(data)
            old = self._uploaded.get(name)
            self._uploaded[name] = img
            if old is not None:
                self._forget_file(old.sha256)
        return img

    def delete(self, name: str) -> StoredImage:
        """Remove an uploaded image's name (KeyError: none; BuiltinImageError: built in).

        Its file goes when no other name and no running instance uses it.
        """
        if name in builtin_programs():
            raise BuiltinImageError(
                f"name: {name!r} is a built-in image; only uploaded images can be deleted"
            )
        with self._lock:
            img = self._uploaded.pop(name)
            self._forget_file(img.sha256)
        return img

    def _forget_file(self, digest: str) -> None:
        """Unlink ``digest``'s file if nothing uses it any more (the lock is held)."""
        if self._pins[digest] or any(i.sha256 == digest for i in self._uploaded.values()):
            return
        self._pins.pop(digest, None)
        if self._files.pop(digest, None) is not None:
            (self.root / f"{digest}.elf").unlink(missing_ok=True)

    def pin(self, img: StoredImage) -> bool:
        """An instance starts from ``img``: keep its file until ``unpin``.  False when
        the image was deleted meanwhile (its file may be gone)."""
        if img.builtin:
            return True
        with self._lock:
            if img.sha256 not in self._files:
                return False
            self._pins[img.sha256] += 1
        return True

    def unpin(self, img: StoredImage) -> None:
        if img.builtin:
            return
        with self._lock:
            self._pins[img.sha256] -= 1
            self._forget_file(img.sha256)

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

    @staticmethod
    def boot_image(img: StoredImage) -> BootImage:
        """``img`` parsed (cached per file version): a Launch checks the program it names."""
        return dataclasses.replace(load_image_file(img.path), name=img.name)

    def list(self) -> list[StoredImage]:
        out = [img for name in sorted(builtin_programs()) if (img := self.get(name))]
        with self._lock:
            out += sorted(self._uploaded.values(), key=lambda i: i.name)
        return out
