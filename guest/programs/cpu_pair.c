/*
 * cpu_pair.c — two processes that compute at once, without a syscall: what
 * preemption costs a CPU-bound multi-process program.
 *
 *   cpu_pair [N]   fork, then parent and child each run N rounds of a small
 *                  arithmetic loop; the parent waits and prints the wall time
 *                  of the whole (default N = 20000000)
 *
 * In a VM the two share one emulated CPU, taking turns by time slice
 * (docs/semantics.md, Scheduling); natively they may run on two CPUs.
 */
#define PROG "cpu_pair"
#include "guest_common.h"

#include <time.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long work(unsigned long n)
{
	volatile unsigned long x = 0;
	unsigned long i;

	for (i = 0; i < n; i++)
		x += i ^ (x >> 3);
	return x;
}

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 0) : 20000000UL;
	double t0;
	pid_t pid;

	top_pid = getpid();
	t0 = now();
	pid = xfork();
	work(n);
	if (pid == 0)
		_exit(0);
	expect_exit(xwaitpid(pid), 0, "child");
	printf("two processes x %lu rounds: %.3f s\n", n, now() - t0);
	return 0;
}
