/*
 * Allocator torture test: usage `malloc_stress [SEED [OPS]]`.
 *
 * A deterministic PRNG drives OPS operations (malloc, calloc, realloc,
 * aligned_alloc, posix_memalign, memalign, free) on a table of slots, with
 * sizes from 1 B to 1 MiB and alignments up to 4096.  Every block is filled
 * with a pattern derived from its id; the pattern is checked before every
 * realloc and free, and the preserved prefix after every realloc.  calloc
 * zeroing, alignment and malloc_usable_size >= size are checked too, plus the
 * runtime's edge cases (free(NULL), malloc(0), bad alignments, overflow).
 *
 * Prints one summary line whose checksum depends only on the operation
 * sequence (never on addresses), so a VM run and a native run agree, and
 * exits 1 on any mismatch.  Live bytes are capped so it fits a 64 MiB VM.
 */
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NSLOTS 256
#define MAX_LIVE_BYTES (16u << 20)
#define DEFAULT_SEED 20210701ULL
#define DEFAULT_OPS 5000

struct slot {
	unsigned char *p;
	size_t size;
	size_t align;
	uint64_t id;
};

static struct slot slots[NSLOTS];
static uint64_t rng_state;
static uint64_t checksum = 1469598103934665603ULL;
static size_t live_bytes;
static unsigned long errors;
static unsigned long n_malloc, n_calloc, n_realloc, n_aligned, n_free;

static uint64_t rng(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static void mix(uint64_t v)
{
	checksum = (checksum ^ v) * 1099511628211ULL;
}

/* Counts a mismatch and goes on (the summary reports them all): not guest_common.h's die(). */
static void fail(const char *what, uint64_t id, size_t size)
{
	errors++;
	if (errors <= 10)
		printf("malloc_stress: FAIL %s (id=%llu size=%zu)\n", what, (unsigned long long)id,
		       size);
}

static unsigned char pattern_base(uint64_t id)
{
	return (unsigned char)(id * 0x9E3779B97F4A7C15ULL >> 56);
}

static void fill(unsigned char *p, size_t from, size_t to, uint64_t id)
{
	unsigned char b = pattern_base(id);
	for (size_t i = from; i < to; i++)
		p[i] = (unsigned char)(b + i);
}

static int check(const unsigned char *p, size_t n, uint64_t id)
{
	unsigned char b = pattern_base(id);
	for (size_t i = 0; i < n; i++)
		if (p[i] != (unsigned char)(b + i))
			return 0;
	return 1;
}

static size_t random_size(void)
{
	uint64_t r = rng() % 1000;
	size_t size;
	if (r < 850)
		size = 1 + rng() % 256;
	else if (r < 990)
		size = 257 + rng() % (16384 - 256);
	else
		size = 16385 + rng() % ((1u << 20) - 16384);
	if (live_bytes + size > MAX_LIVE_BYTES)
		size = 1 + rng() % 64;
	return size;
}

static void check_alignment(const struct slot *s)
{
	if ((uintptr_t)s->p % s->align != 0)
		fail("alignment", s->id, s->size);
	if (malloc_usable_size(s->p) < s->size)
		fail("malloc_usable_size < size", s->id, s->size);
}

static void allocate(struct slot *s, uint64_t id)
{
	size_t size = random_size();
	size_t align = 16;
	unsigned kind = (unsigned)(rng() % 6);
	void *p = NULL;

	switch (kind) {
	case 0:
	case 1:
		p = malloc(size);
		n_malloc++;
		break;
	case 2: {
		size_t nmemb = 1 + rng() % 4;
		size_t elem = (size + nmemb - 1) / nmemb;
		size = nmemb * elem;
		p = calloc(nmemb, elem);
		if (p) {
			unsigned char *c = p;
			for (size_t i = 0; i < size; i++)
				if (c[i] != 0) {
					fail("calloc not zeroed", id, size);
					break;
				}
		}
		n_calloc++;
		break;
	}
	case 3:
		align = (size_t)1 << (4 + rng() % 9); /* 16 .. 4096 */
		size = (size + align - 1) / align * align;
		p = aligned_alloc(align, size);
		n_aligned++;
		break;
	case 4: {
		align = (size_t)1 << (3 + rng() % 10); /* 8 .. 4096 */
		int err = posix_memalign(&p, align, size);
		if (err != 0) {
			fail("posix_memalign error", id, size);
			p = NULL;
		}
		n_aligned++;
		break;
	}
	default:
		align = (size_t)1 << (rng() % 13); /* 1 .. 4096 */
		p = memalign(align, size);
		n_aligned++;
		break;
	}
	mix(kind * 1000003u + size);
	if (!p) {
		fail("allocation returned NULL", id, size);
		return;
	}
	s->p = p;
	s->size = size;
	s->align = align < 16 ? 16 : align;
	s->id = id;
	live_bytes += size;
	check_alignment(s);
	fill(s->p, 0, size, id);
}

static void release(struct slot *s)
{
	if (!check(s->p, s->size, s->id))
		fail("pattern before free", s->id, s->size);
	free(s->p);
	live_bytes -= s->size;
	mix(s->id * 31 + s->size);
	s->p = NULL;
	n_free++;
}

static void resize(struct slot *s)
{
	size_t old = s->size;
	size_t size = random_size();
	if (!check(s->p, old, s->id))
		fail("pattern before realloc", s->id, old);
	unsigned char *q = realloc(s->p, size);
	n_realloc++;
	mix(old * 7 + size);
	if (!q) {
		fail("realloc returned NULL", s->id, size);
		return;
	}
	size_t keep = old < size ? old : size;
	if (!check(q, keep, s->id))
		fail("prefix after realloc", s->id, size);
	s->p = q;
	s->size = size;
	s->align = 16;
	live_bytes = live_bytes - old + size;
	check_alignment(s);
	fill(q, keep, size, s->id);
}

/*
 * Edge cases are called through volatile function pointers: clang knows the
 * malloc family's semantics and, e.g., assumes malloc never sets errno (it
 * folded `errno` after a failing malloc to the value stored before the call)
 * or elides an unused allocation and assumes it succeeded.
 */
static void *(*volatile v_malloc)(size_t) = malloc;
static void *(*volatile v_calloc)(size_t, size_t) = calloc;
static void *(*volatile v_realloc)(void *, size_t) = realloc;
static void *(*volatile v_aligned_alloc)(size_t, size_t) = aligned_alloc;
static int (*volatile v_posix_memalign)(void **, size_t, size_t) = posix_memalign;
static void (*volatile v_free)(void *) = free;

static void edge_cases(void)
{
	v_free(NULL);

	void *z = v_malloc(0);
	if (!z)
		fail("malloc(0) returned NULL", 0, 0);
	v_free(z);

	void *r = v_realloc(NULL, 100);
	if (!r)
		fail("realloc(NULL, 100) returned NULL", 0, 100);
	v_free(r);

	void *p = (void *)&p;
	if (v_posix_memalign(&p, 24, 64) != EINVAL)
		fail("posix_memalign(24) not EINVAL", 0, 64);
	if (v_posix_memalign(&p, sizeof(void *) / 2, 64) != EINVAL)
		fail("posix_memalign(4) not EINVAL", 0, 64);
	if (p != (void *)&p)
		fail("posix_memalign wrote *res on error", 0, 64);

	errno = 0;
	if (v_aligned_alloc(48, 96) != NULL || errno != EINVAL)
		fail("aligned_alloc(48) not EINVAL", 0, 96);

	errno = 0;
	if (v_calloc(SIZE_MAX / 2, 4) != NULL || errno != ENOMEM)
		fail("calloc overflow not ENOMEM", 0, 0);

	errno = 0;
	if (v_malloc(SIZE_MAX - 64) != NULL || errno != ENOMEM)
		fail("malloc(huge) not ENOMEM", 0, 0);

	char *a = v_malloc(32);
	if (!a) {
		fail("malloc(32) returned NULL", 0, 32);
		return;
	}
	memcpy(a, "0123456789abcdefghijklmnopqrstu", 32);
	errno = 0;
	if (v_realloc(a, SIZE_MAX - 64) != NULL || errno != ENOMEM)
		fail("realloc(huge) not ENOMEM", 0, 0);
	if (memcmp(a, "0123456789abcdefghijklmnopqrstu", 32) != 0)
		fail("failed realloc changed the block", 0, 32);

	/* realloc(p, 0) keeps a (minimal) block, as in musl, in both modes */
	void *m = v_realloc(a, 0);
	if (!m)
		fail("realloc(p, 0) returned NULL", 0, 0);
	v_free(m);
}

int main(int argc, char **argv)
{
	unsigned long long seed = argc > 1 ? strtoull(argv[1], NULL, 0) : DEFAULT_SEED;
	long ops = argc > 2 ? strtol(argv[2], NULL, 0) : DEFAULT_OPS;
	rng_state = seed ? seed : DEFAULT_SEED;

	edge_cases();
	for (long op = 0; op < ops; op++) {
		struct slot *s = &slots[rng() % NSLOTS];
		if (!s->p)
			allocate(s, (uint64_t)op + 1);
		else if (rng() % 3 == 0)
			resize(s);
		else
			release(s);
	}
	for (int i = 0; i < NSLOTS; i++)
		if (slots[i].p)
			release(&slots[i]);
	if (live_bytes != 0)
		fail("live byte accounting", 0, live_bytes);

	printf("malloc_stress: seed=%llu ops=%ld malloc=%lu calloc=%lu realloc=%lu aligned=%lu "
	       "free=%lu errors=%lu checksum=%016llx\n",
	       seed, ops, n_malloc, n_calloc, n_realloc, n_aligned, n_free, errors,
	       (unsigned long long)checksum);
	return errors ? 1 : 0;
}
