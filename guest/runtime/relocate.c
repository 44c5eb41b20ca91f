/*
 * relocate.c — the word scan of thread fork and copy fork, built for the HOST
 * (not the guest) by the toolchain, like preempt_hook.c, and called through
 * ctypes (tender_service/fork/relocate.py).
 *
 * A forked child's copied memory holds pointers into its parent's regions
 * (the stack, the TLS block, heap blocks, the image...); each such word is
 * rebased by its region's offset to the child's copy.  In Python that scan
 * was the largest part of a thread fork (issue 17: a comprehension over every
 * word of the live stack); here it is one pass at memory speed, and one call
 * per fork (a ctypes call costs more than scanning a thousand words).
 *
 * unifork_relocate(job, out) — job is an array of 64-bit words:
 *   c, k, m, other_lo, other_hi,
 *   c copies:  destination, source (host addresses), bytes
 *   k spans:   host address, word count       (the memory to scan, in order)
 *   m regions: lo, hi, delta (mod 2**64)      (sorted by lo, disjoint)
 * The copies are made first (thread fork's stack and TLS block: the copy and
 * its scan in one call, as the call costs more than either; a copy never
 * overlaps its source, each is a block of its own).  Then every word of the
 * spans that lies in a region moves by that region's delta.  A word that lies
 * in no region but in [other_lo, other_hi) is left alone and its index is
 * appended to out, counting words across the spans in order (out has room
 * for every word): a word the caller classifies itself, as thread fork does
 * with heap blocks it duplicates on demand.  Returns the number of indices in
 * out; job[1] is overwritten with the number of words rebased.  The library
 * is linked with -nostdlib: its one call out, memcpy, is the loading
 * process's (a Python process always has libc).
 */
#include <stdint.h>

uint64_t unifork_relocate(uint64_t *job, uint32_t *out)
{
	uint64_t c = job[0], k = job[1], m = job[2], other_lo = job[3], other_hi = job[4];
	const uint64_t *copies = job + 5, *spans = copies + 3 * c, *regions = spans + 2 * k;
	uint64_t lo_all = m ? regions[0] : 0, hi_all = m ? regions[3 * (m - 1) + 1] : 0;
	uint64_t recorded = 0, rebased = 0, index = 0;

	for (uint64_t i = 0; i < c; i++)
		__builtin_memcpy((void *)(uintptr_t)copies[3 * i],
				 (const void *)(uintptr_t)copies[3 * i + 1], copies[3 * i + 2]);
	for (uint64_t s = 0; s < k; s++) {
		unsigned char *words = (unsigned char *)(uintptr_t)spans[2 * s];
		uint64_t n = spans[2 * s + 1];

		for (uint64_t i = 0; i < n; i++, index++) {
			uint64_t v;

			/* any alignment: a plain load on x86 */
			__builtin_memcpy(&v, words + 8 * i, 8);
			if (v >= lo_all && v < hi_all) {
				uint64_t a = 0, b = m; /* the last region whose lo <= v */
				while (b - a > 1) {
					uint64_t mid = a + (b - a) / 2;
					if (regions[3 * mid] <= v)
						a = mid;
					else
						b = mid;
				}
				if (v < regions[3 * a + 1]) {
					v += regions[3 * a + 2];
					__builtin_memcpy(words + 8 * i, &v, 8);
					rebased++;
					continue;
				}
			}
			if (v >= other_lo && v < other_hi)
				out[recorded++] = (uint32_t)index;
		}
	}
	job[1] = rebased;
	return recorded;
}
