/*
 * exec_loop N PROG [vfork] — fork (or vfork) + execve(PROG, "quiet") +
 * waitpid, N times: exec latency.  Prints "N execs" and, on stderr,
 * microseconds per iteration.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define PROG "exec_loop"

#include "guest_common.h"

extern char **environ;

int main(int argc, char **argv)
{
	struct timespec t0, t1;
	int i, n, st;
	char *args[3];

	top_pid = getpid();
	if (argc != 3 && argc != 4)
		die("usage: exec_loop N PROG [vfork]");
	n = atoi(argv[1]);
	args[0] = argv[2];
	args[1] = "quiet";
	args[2] = NULL;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++) {
		pid_t pid;

		fflush(stdout);
		pid = argc == 4 ? vfork() : fork();
		if (pid < 0)
			DIE_ERRNO("fork");
		if (pid == 0) {
			execve(argv[2], args, environ);
			_exit(127);
		}
		st = xwaitpid(pid);
		expect_exit(st, 0, "exec child");
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%d execs\n", n);
	fprintf(stderr, "exec_loop: %.1f us per %s+exec+wait\n",
		((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / (n ? n : 1),
		argc == 4 ? "vfork" : "fork");
	return 0;
}
