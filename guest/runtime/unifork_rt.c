/*
 * unifork guest runtime: the malloc family, forwarded to the unikernel's bmk
 * allocator inside a VM and to the libc's own allocator on a real kernel.
 *
 * `unifork cc` links every guest with -Wl,--wrap=<fn> for each function
 * below, so every reference to malloc & co. (in the program and in libc's own
 * objects such as fopen or strdup) lands here.  A one-time probe hypercall
 * decides the mode; both a forked child and its parent see the same answer,
 * so a plain global is enough.  reallocarray and valloc are wrapped too:
 * the bundled libc implements them by calling its allocator directly.
 *
 * The wrappers, not the backend, own the argument rules, so that a program
 * behaves the same natively and in a VM:
 *   - sizes >= SIZE_MAX/2 - 4096 fail with ENOMEM (musl's size_overflows);
 *   - malloc(0) returns a unique pointer; realloc(p, 0) returns a minimal
 *     block and frees p (musl semantics, never NULL on success);
 *   - aligned_alloc/memalign: alignment must be a power of two (0 means
 *     "none"), otherwise EINVAL; posix_memalign additionally needs a multiple
 *     of sizeof(void *) and reports errors by return value, leaving errno;
 *   - free(NULL) is a no-op and free never changes errno.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "unifork_hypercalls.h"

/*
 * This file is compiled with the user's flags (-std=c89, -pedantic, -Weverything,
 * -Werror...): it is written to be valid in every C dialect clang accepts, and
 * its diagnostics are silenced so that they never appear in a user's build.
 */
#pragma clang diagnostic ignored "-Weverything"

void *__real_malloc(size_t n);
void __real_free(void *p);
void *__real_calloc(size_t nmemb, size_t size);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t align, size_t n);
size_t __real_malloc_usable_size(void *p);

void *__wrap_malloc(size_t n);
void __wrap_free(void *p);
void *__wrap_calloc(size_t nmemb, size_t size);
void *__wrap_realloc(void *p, size_t n);
void *__wrap_reallocarray(void *p, size_t nmemb, size_t size);
void *__wrap_aligned_alloc(size_t align, size_t n);
int __wrap_posix_memalign(void **res, size_t align, size_t n);
void *__wrap_memalign(size_t align, size_t n);
void *__wrap_valloc(size_t n);
size_t __wrap_malloc_usable_size(void *p);

#define MODE_UNKNOWN 0
#define MODE_VM 1
#define MODE_NATIVE 2

/* Default alignment of malloc: _Alignof(max_align_t) on x86-64 (not spelled
 * that way because max_align_t is missing under -std=c99 and earlier). */
#define MIN_ALIGN 16
#define UNIFORK_PAGE_SIZE 4096

static int unifork_mode = MODE_UNKNOWN;

int unifork_in_vm(void)
{
	int mode = __atomic_load_n(&unifork_mode, __ATOMIC_RELAXED);
	if (mode == MODE_UNKNOWN) {
		long r = unifork_syscall0(UNIFORK_HC_PROBE);
		mode = r == (long)UNIFORK_HC_MAGIC ? MODE_VM : MODE_NATIVE;
		__atomic_store_n(&unifork_mode, mode, __ATOMIC_RELAXED);
	}
	return mode == MODE_VM;
}

static int size_overflows(size_t n)
{
	return n >= SIZE_MAX / 2 - UNIFORK_PAGE_SIZE;
}

static int bad_align(size_t align)
{
	return (align & (align - 1)) != 0;
}

/* Turns a hypercall result into a pointer, or NULL with errno set. */
static void *hc_pointer(long r)
{
	if (unifork_is_error(r)) {
		errno = (int)-r;
		return NULL;
	}
	if (r == 0)
		errno = ENOMEM;
	return (void *)r;
}

/* Allocation with an already validated alignment; errno set on failure. */
static void *alloc_aligned(size_t align, size_t n)
{
	if (size_overflows(n)) {
		errno = ENOMEM;
		return NULL;
	}
	if (align < MIN_ALIGN)
		align = MIN_ALIGN;
	if (!unifork_in_vm())
		return align == MIN_ALIGN ? __real_malloc(n) : __real_aligned_alloc(align, n);
	return hc_pointer(unifork_syscall2(UNIFORK_HC_MALLOC, (long)(n ? n : 1), (long)align));
}

void *__wrap_malloc(size_t n)
{
	return alloc_aligned(MIN_ALIGN, n);
}

void __wrap_free(void *p)
{
	int saved;
	if (!p)
		return;
	saved = errno;
	if (unifork_in_vm())
		/* -EINVAL (not a live block) is ignored: under thread fork a block
		 * shared by parent and child may be freed by both. */
		(void)unifork_syscall1(UNIFORK_HC_FREE, (long)p);
	else
		__real_free(p);
	errno = saved;
}

void *__wrap_calloc(size_t nmemb, size_t size)
{
	size_t n;
	if (__builtin_mul_overflow(nmemb, size, &n) || size_overflows(n)) {
		errno = ENOMEM;
		return NULL;
	}
	if (!unifork_in_vm())
		return __real_calloc(nmemb, size);
	if (n == 0)
		nmemb = size = 1;
	return hc_pointer(unifork_syscall2(UNIFORK_HC_CALLOC, (long)nmemb, (long)size));
}

void *__wrap_realloc(void *p, size_t n)
{
	if (!p)
		return __wrap_malloc(n);
	if (size_overflows(n)) {
		errno = ENOMEM;
		return NULL;
	}
	if (n == 0)
		n = 1; /* musl: shrink to a minimal block, never "free and NULL" */
	if (!unifork_in_vm())
		return __real_realloc(p, n);
	return hc_pointer(unifork_syscall2(UNIFORK_HC_REALLOC, (long)p, (long)n));
}

void *__wrap_reallocarray(void *p, size_t nmemb, size_t size)
{
	size_t n;
	if (__builtin_mul_overflow(nmemb, size, &n)) {
		errno = ENOMEM;
		return NULL;
	}
	return __wrap_realloc(p, n);
}

void *__wrap_aligned_alloc(size_t align, size_t n)
{
	if (bad_align(align)) {
		errno = EINVAL;
		return NULL;
	}
	return alloc_aligned(align, n);
}

void *__wrap_memalign(size_t align, size_t n)
{
	return __wrap_aligned_alloc(align, n);
}

void *__wrap_valloc(size_t n)
{
	return alloc_aligned(UNIFORK_PAGE_SIZE, n);
}

int __wrap_posix_memalign(void **res, size_t align, size_t n)
{
	int saved, err;
	void *mem;
	if (align < sizeof(void *) || bad_align(align))
		return EINVAL;
	saved = errno;
	mem = alloc_aligned(align, n);
	err = errno;
	errno = saved;
	if (!mem)
		return err ? err : ENOMEM;
	*res = mem;
	return 0;
}

size_t __wrap_malloc_usable_size(void *p)
{
	long r;
	if (!p)
		return 0;
	if (!unifork_in_vm())
		return __real_malloc_usable_size(p);
	r = unifork_syscall1(UNIFORK_HC_USABLE_SIZE, (long)p);
	return unifork_is_error(r) ? 0 : (size_t)r;
}
