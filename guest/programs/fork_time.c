/*
 * How long does fork() take?  (The measurement of the thesis's listing 4.1.)
 *
 *   fork_time          one fork; both processes print the time they saw and
 *                      who they are ("fork took: <s>s" then "parent" / "child",
 *                      the two lines in one write); the parent waits.
 *   fork_time -n N     N forks in a row, for benchmarks: the parent times each
 *                      one from just before fork() to just after it returns in
 *                      the parent (CLOCK_MONOTONIC) and prints one line
 *                      `fork_us=<microseconds>` per run, then a summary line.
 *                      Each child exits at once with status run%100, which the
 *                      parent checks.
 *
 * Exit status 0 only if every fork succeeded and every child exited as
 * expected.  stdout is flushed before each fork so no line is printed twice.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double monotonic_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int wait_for(pid_t pid, int expected)
{
	int status;
	if (waitpid(pid, &status, 0) != pid) {
		perror("waitpid");
		return 0;
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status) != expected) {
		fprintf(stderr, "fork_time: child %d ended with status 0x%x, expected exit %d\n",
			(int)pid, status, expected);
		return 0;
	}
	return 1;
}

static int single(void)
{
	struct timeval t1, t2;

	fflush(stdout);
	gettimeofday(&t1, NULL);
	pid_t pid = fork();
	gettimeofday(&t2, NULL);
	long us = (t2.tv_sec - t1.tv_sec) * 1000000L + (t2.tv_usec - t1.tv_usec);

	if (pid < 0) {
		perror("fork");
		return 1;
	}
	/* both lines in one write: in a merged stream (a pipe, a VM console) each
	 * process's pair stays together, so a reader can tell whose time it is */
	char line[64];
	snprintf(line, sizeof line, "fork took: %.6fs\n%s\n", (double)us / 1e6,
		 pid == 0 ? "child" : "parent");
	fputs(line, stdout);
	fflush(stdout);
	if (pid == 0)
		return 0;
	return wait_for(pid, 0) ? 0 : 1;
}

static int repeat(long runs)
{
	double total = 0, min = 0, max = 0;
	int ok = 1;

	for (long i = 0; i < runs; i++) {
		fflush(stdout);
		double t1 = monotonic_us();
		pid_t pid = fork();
		if (pid == 0)
			_exit((int)(i % 100));
		double us = monotonic_us() - t1;
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		printf("fork_us=%.3f\n", us);
		total += us;
		if (i == 0 || us < min)
			min = us;
		if (i == 0 || us > max)
			max = us;
		if (!wait_for(pid, (int)(i % 100)))
			ok = 0;
	}
	printf("fork_summary runs=%ld mean_us=%.3f min_us=%.3f max_us=%.3f ok=%d\n", runs,
	       runs ? total / (double)runs : 0.0, min, max, ok);
	return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 1)
		return single();
	if (argc == 3 && strcmp(argv[1], "-n") == 0) {
		char *end;
		long runs = strtol(argv[2], &end, 10);
		if (*end == '\0' && runs >= 0)
			return repeat(runs);
	}
	fprintf(stderr, "usage: fork_time [-n RUNS]\n");
	return 2;
}
