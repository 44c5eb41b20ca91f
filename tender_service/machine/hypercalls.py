"""The guest <-> host interface beyond Linux syscalls (solo5-style: few, documented).

The guest runtime (guest/runtime/unifork_hypercalls.h) issues these through the
ordinary ``syscall`` instruction with numbers >= 0x1000, which Linux does not
use: natively they fail with -ENOSYS, which is how the same binary detects that
it runs on a real kernel and falls back to musl's own allocator.

Calling convention: Linux x86-64 syscall ABI (rax = number, args in rdi, rsi,
rdx; result in rax, -errno on failure).  The names and numbers here and in the
C header must agree; tests/test_hypercalls.py checks that they do.
"""

from __future__ import annotations

HC_BASE = 0x1000

#: returns HC_MAGIC in a unifork VM (-ENOSYS on Linux)
HC_PROBE = 0x1000
#: (size, align) -> pointer or -ENOMEM / -EINVAL
HC_MALLOC = 0x1001
#: (ptr) -> 0, or -EINVAL for a pointer that is not a live allocation
HC_FREE = 0x1002
#: (ptr, size) -> pointer or -ENOMEM (the old block is then left untouched)
HC_REALLOC = 0x1003
#: (nmemb, size) -> zeroed pointer or -ENOMEM (also on nmemb*size overflow)
HC_CALLOC = 0x1004
#: (ptr) -> usable bytes of a live allocation, 0 for NULL, -EINVAL otherwise
HC_USABLE_SIZE = 0x1005

#: "unifork" in ASCII, returned by HC_PROBE
HC_MAGIC = 0x756E69666F726B

HYPERCALLS: dict[str, int] = {
    "HC_PROBE": HC_PROBE,
    "HC_MALLOC": HC_MALLOC,
    "HC_FREE": HC_FREE,
    "HC_REALLOC": HC_REALLOC,
    "HC_CALLOC": HC_CALLOC,
    "HC_USABLE_SIZE": HC_USABLE_SIZE,
}
