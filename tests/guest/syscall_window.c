/*
 * syscall_window — syscalls at the end of long straight-line blocks.
 *
 * `syscall_window [N]` (default 20000) runs N times a block of 2048 memory
 * increments that ends in a raw getppid syscall, and counts the results that differ
 * from the first one.  The guest spends its time in straight-line code just
 * before a syscall, so a stop requested from another thread (the VM's host
 * events) is likely to be pending when the syscall runs: the syscall must
 * still be made, not skipped (a skipped one leaves its number, 110, in rax).
 * (Not x87 instructions instead: a few hundred of them in a row
 * crash Unicorn 2.1.4, see docs/reliability.md.)
 * Prints `calls=<N> mismatches=<M>`; exit 1 if M > 0.
 */
#include <stdio.h>
#include <stdlib.h>

static long work;

static long getppid_after_work(void)
{
	long rax = 110; /* SYS_getppid */

	/* memory increments: real work for the emulator (nops would be compiled away) */
	__asm__ volatile(".rept 2048\n\taddq $1, %1\n\t.endr\n\tsyscall"
			 : "+a"(rax), "+m"(work)
			 :
			 : "rcx", "r11", "memory");
	return rax;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 20000L;
	long first = getppid_after_work(), mismatches = 0;

	for (long i = 0; i < n; i++)
		if (getppid_after_work() != first)
			mismatches++;
	printf("calls=%ld mismatches=%ld\n", n, mismatches);
	return mismatches ? 1 : 0;
}
