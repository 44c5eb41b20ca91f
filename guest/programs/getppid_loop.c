/*
 * Syscall round-trip cost: `getppid_loop [N]` calls getppid() N times and
 * prints the mean cost measured inside the program with
 * clock_gettime(CLOCK_MONOTONIC), as `ns_per_call=<float>`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 100000L;
	struct timespec t1, t2;
	pid_t first = getppid();
	long mismatches = 0;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	for (long i = 0; i < n; i++)
		if (getppid() != first)
			mismatches++;
	clock_gettime(CLOCK_MONOTONIC, &t2);

	double ns = (double)(t2.tv_sec - t1.tv_sec) * 1e9 + (double)(t2.tv_nsec - t1.tv_nsec);
	printf("calls=%ld\n", n);
	printf("ns_per_call=%.3f\n", n > 0 ? ns / (double)n : 0.0);
	return mismatches ? 1 : 0;
}
