/*
 * relocate.c — the word scan of thread fork and copy fork, built for the HOST
 * (not the guest) by the toolchain, like preempt_hook.c, and called through
 * ctypes (tender_service/fork/relocate.py).
 *
 * A forked child's copied memory holds pointers into its parent's regions
 * (the stack, the TLS block, heap blocks, the image...); each such word is
 * rebased by its region's offset to the child's copy.  In Python that scan
 * was a third of a thread fork (issue 17: a comprehension over every word of
 * the live stack); here it is one pass at memory speed.
 *
 * unifork_relocate(words, n, regions, m, other_lo, other_hi, out):
 *   for each of the n 8-byte words: if it lies in one of the m regions
 *   (sorted by lo, disjoint: lo, hi, delta triples), add that region's
 *   delta; else if it lies in [other_lo, other_hi), append its index to out
 *   (a word the caller classifies itself: thread fork's heap blocks, which it
 *   duplicates on demand; out has room for n).  Returns the number of words
 *   recorded in out; *changed (if not null) gets the number rebased.
 * No libc: the library is linked with -nostdlib.
 */
#include <stdint.h>

struct unifork_region {
	uint64_t lo, hi;
	int64_t delta;
};

uint64_t unifork_relocate(uint64_t *words, uint64_t n, const struct unifork_region *regions,
			  uint64_t m, uint64_t other_lo, uint64_t other_hi, uint32_t *out,
			  uint64_t *changed)
{
	uint64_t recorded = 0, rebased = 0;
	uint64_t lo_all = m ? regions[0].lo : 0, hi_all = m ? regions[m - 1].hi : 0;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t v;

		__builtin_memcpy(&v, words + i, 8); /* any alignment: a plain load on x86 */

		if (v >= lo_all && v < hi_all) {
			/* the last region whose lo <= v */
			uint64_t a = 0, b = m;
			while (b - a > 1) {
				uint64_t mid = a + (b - a) / 2;
				if (regions[mid].lo <= v)
					a = mid;
				else
					b = mid;
			}
			if (v < regions[a].hi) {
				v += (uint64_t)regions[a].delta;
				__builtin_memcpy(words + i, &v, 8);
				rebased++;
				continue;
			}
		}
		if (v >= other_lo && v < other_hi)
			out[recorded++] = (uint32_t)i;
	}
	if (changed)
		*changed = rebased;
	return recorded;
}
