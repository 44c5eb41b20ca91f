/*
 * unifork guest <-> host interface (C side).
 *
 * The numbers below mirror tender_service/machine/hypercalls.py: every
 * Python constant HC_X has a C twin UNIFORK_HC_X with the same value, and
 * tests/test_hypercalls.py parses both files to prove it.  Hypercalls use the
 * ordinary Linux x86-64 `syscall` instruction with numbers >= 0x1000, which a
 * real Linux kernel rejects with -ENOSYS; that is how the same static binary
 * tells a unifork VM from a native run.
 *
 * Calling convention: rax = number, args in rdi, rsi, rdx, r10, r8, r9;
 * result in rax, -errno (-4095..-1) on failure.
 */
#ifndef UNIFORK_HYPERCALLS_H
#define UNIFORK_HYPERCALLS_H

#define UNIFORK_HC_BASE 0x1000

/* () -> UNIFORK_HC_MAGIC in a unifork VM, -ENOSYS on Linux */
#define UNIFORK_HC_PROBE 0x1000
/* (size, align) -> pointer or -ENOMEM / -EINVAL */
#define UNIFORK_HC_MALLOC 0x1001
/* (ptr) -> 0, or -EINVAL for a pointer that is not a live allocation */
#define UNIFORK_HC_FREE 0x1002
/* (ptr, size) -> pointer or -ENOMEM (the old block is then left untouched) */
#define UNIFORK_HC_REALLOC 0x1003
/* (nmemb, size) -> zeroed pointer or -ENOMEM (also on nmemb*size overflow) */
#define UNIFORK_HC_CALLOC 0x1004
/* (ptr) -> usable bytes of a live allocation, 0 for NULL, -EINVAL otherwise */
#define UNIFORK_HC_USABLE_SIZE 0x1005

/* "unifork" in ASCII, returned by UNIFORK_HC_PROBE */
#define UNIFORK_HC_MAGIC 0x756E69666F726B

/* Largest errno a raw syscall result can encode (Linux convention). */
#define UNIFORK_MAX_ERRNO 4095

/* Raw syscalls: no errno, no libc; the kernel clobbers rcx and r11.
 * (__inline__ rather than inline: valid under -std=c89 too.) */
static __inline__ long unifork_syscall0(long n)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n) : "rcx", "r11", "memory");
	return ret;
}

static __inline__ long unifork_syscall1(long n, long a1)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a1) : "rcx", "r11", "memory");
	return ret;
}

static __inline__ long unifork_syscall2(long n, long a1, long a2)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a1), "S"(a2)
			 : "rcx", "r11", "memory");
	return ret;
}

static __inline__ long unifork_syscall3(long n, long a1, long a2, long a3)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a1), "S"(a2), "d"(a3)
			 : "rcx", "r11", "memory");
	return ret;
}

static __inline__ long unifork_syscall4(long n, long a1, long a2, long a3, long a4)
{
	long ret;
	register long r10 __asm__("r10") = a4;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static __inline__ long unifork_syscall5(long n, long a1, long a2, long a3, long a4, long a5)
{
	long ret;
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

static __inline__ long unifork_syscall6(long n, long a1, long a2, long a3, long a4, long a5,
				    long a6)
{
	long ret;
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	register long r9 __asm__("r9") = a6;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

/* True when a raw syscall result encodes -errno. */
static __inline__ int unifork_is_error(long ret)
{
	return (unsigned long)ret > (unsigned long)-(UNIFORK_MAX_ERRNO + 1);
}

/*
 * 1 inside a unifork VM, 0 on a real kernel.  Defined in unifork_rt.c, which
 * `unifork cc` links into every guest; the answer is computed once.
 */
int unifork_in_vm(void);

#endif /* UNIFORK_HYPERCALLS_H */
