/*
 * exec_chain.c — exec latency: the program execs itself N times, no fork.
 *
 * usage: exec_chain N
 * Each exec'd image takes the remaining count and the time its execve was
 * called from its argv, prints that exec's latency and execs the path it was
 * started by (AT_EXECFN) again; on stdout:
 *   exec_us=<microseconds>  one line per exec, in order: CLOCK_MONOTONIC from
 *                           just before execve to the new image's main (musl's
 *                           start-up included); the first is the cold one
 *   execs=N                 from the last image
 * stdout is flushed before each execve (an exec drops what a buffer holds).
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
	char left[32], called[32], total[32];
	const char *self = (const char *)getauxval(AT_EXECFN);
	long n, all;

	top_pid = getpid();
	if (argc == 2) { /* the first image: nothing timed yet */
		n = all = atol(argv[1]);
	} else if (argc == 4) {
		long long t = now_ns();

		n = atol(argv[1]);
		all = atol(argv[3]);
		printf("exec_us=%.3f\n", (t - atoll(argv[2])) / 1e3);
	} else {
		die("usage: exec_chain N");
	}
	if (n <= 0) {
		printf("execs=%ld\n", all > 0 ? all : 0);
		return 0;
	}
	fflush(stdout);
	snprintf(left, sizeof left, "%ld", n - 1);
	snprintf(total, sizeof total, "%ld", all);
	snprintf(called, sizeof called, "%lld", now_ns());
	char *args[] = {(char *)self, left, called, total, NULL};
	execve(self, args, environ);
	die("execve %s: %s", self, strerror(errno));
}
