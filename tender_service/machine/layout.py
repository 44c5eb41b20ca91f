"""Guest address-space layout.

One flat address space, no protection (as Rumprun): a null guard (nothing is
mapped below IMAGE_MIN), the ELF image at its linked address (static-PIE at
PIE_BASE), and the bmk heap at a distinctive high base, so that a conservative
scan of a stack rarely mistakes an integer for a heap pointer.  The vDSO and
its clock page sit between the images and the heap.  Thread stacks
and TLS blocks come from the heap, as in Rumprun.
"""

from __future__ import annotations

PAGE_SIZE = 4096
PAGE_MASK = ~(PAGE_SIZE - 1)

#: nothing is ever mapped below this: NULL and small offsets from it fault
GUARD_SIZE = 0x10000
#: static-PIE images are loaded here: 64 KiB above 16 MiB, so that no address
#: of an image (under 16 MiB - 64 KiB) has a zero third byte.  A C string of one
#: or two characters written over a stale pointer into the image leaves exactly
#: such a word ("bg\0" + 0x01...); with this base that word is no image address,
#: and copy fork's conservative scan (fork/copy.py) does not rebase it
PIE_BASE = 0x0000_0000_0101_0000
#: the bmk heap starts here (64 TiB): far from small integers and from text/data
HEAP_BASE = 0x0000_4000_0000_0000
#: highest address an image may occupy (below the heap)
IMAGE_MAX = 0x0000_0001_0000_0000
#: the vvar page and the vDSO (machine/vclock.py), above every image
VDSO_BASE = IMAGE_MAX

DEFAULT_RAM = 64 << 20
DEFAULT_STACK = 256 << 10
MIN_RAM = 4 << 20
MAX_RAM = 4 << 30


def page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & PAGE_MASK


def page_down(n: int) -> int:
    return n & PAGE_MASK
