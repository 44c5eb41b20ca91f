/*
 * exec_chain.c — exec latency: the program execs itself N times, no fork.
 *
 * usage: exec_chain N
 * Each exec'd image takes the remaining count and the start time from its
 * argv and execs the path it was started by (AT_EXECFN) again; the last one
 * prints, on stdout:
 *   execs=N
 *   exec_us=<microseconds per execve, CLOCK_MONOTONIC, start-up of the new
 *            image (musl's init, main) included>
 * The program must be in the file system (a baked image's /bin, natively a file).
 */
#define PROG "exec_chain"
#define _GNU_SOURCE
#include "guest_common.h"

#include <sys/auxv.h>
#include <time.h>

extern char **environ;

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	char left[32], start[32], total[32];
	const char *self = (const char *)getauxval(AT_EXECFN);
	long long t0;
	long n, all;

	top_pid = getpid();
	if (argc == 2) { /* the first image: nothing timed yet */
		all = atol(argv[1]);
		n = all;
		t0 = now_ns();
	} else if (argc == 4) {
		n = atol(argv[1]);
		t0 = atoll(argv[2]);
		all = atol(argv[3]);
	} else {
		die("usage: exec_chain N");
	}
	if (n <= 0) {
		printf("execs=%ld\n", all);
		printf("exec_us=%.3f\n", all ? (now_ns() - t0) / 1e3 / all : 0.0);
		return 0;
	}
	snprintf(left, sizeof left, "%ld", n - 1);
	snprintf(start, sizeof start, "%lld", t0);
	snprintf(total, sizeof total, "%ld", all);
	char *args[] = {(char *)self, left, start, total, NULL};
	execve(self, args, environ);
	die("execve %s: %s", self, strerror(errno));
}
