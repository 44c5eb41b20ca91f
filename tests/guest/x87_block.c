/*
 * x87_block — a straight-line block of 480 x87 square roots.
 *
 * Unicorn 2.1.4 cannot translate such a block: its code generator runs out
 * of temporaries and the emulating process dies with SIGSEGV (a known
 * Unicorn bug: unicorn-engine/unicorn#2240).  Natively it prints `ok` and
 * exits 0.  docs/reliability.md says what that does to a tender.
 */
#include <stdio.h>

int main(void)
{
	__asm__ volatile("fld1\n\t.rept 480\n\tfsqrt\n\t.endr\n\tfstp %%st(0)" ::: "st");
	printf("ok\n");
	return 0;
}
