/*
 * fork_exit_wait — many short-lived children and their exit statuses.
 *
 * Checks: N children (default 100, -n N); child i does _exit(i % 7); the
 * parent forks them all, then waitpid()s each specific pid (in reverse order)
 * and checks WIFEXITED and WEXITSTATUS == i % 7; finally waitpid(-1) must fail
 * with ECHILD.  With -t the children are run one at a time instead and every
 * iteration (fork + waitpid of one child, CLOCK_MONOTONIC) is timed.
 *
 * Output:      ok N children
 * With -t:     fork_wait_us=<float>   (one line per child, before the ok line)
 * Thread-fork VM: identical output (the timings differ, of course).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <time.h>

#define PROG "fork_exit_wait"

#include "guest_common.h"

static double now_us(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		DIE_ERRNO("clock_gettime");
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	int n = 100, timing = 0, opt, i, st;
	pid_t *pids;
	char who[64];

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "n:t")) != -1) {
		switch (opt) {
		case 'n': n = atoi(optarg); break;
		case 't': timing = 1; break;
		default:
			fprintf(stderr, "usage: %s [-n N] [-t]\n", argv[0]);
			return 2;
		}
	}
	if (n < 0)
		die("bad -n %d", n);

	if (!timing) {
		pids = malloc(sizeof *pids * (size_t)(n ? n : 1));
		if (!pids)
			die("malloc failed");
		for (i = 0; i < n; i++) {
			pid_t pid = xfork();
			if (pid == 0)
				_exit(i % 7);
			pids[i] = pid;
		}
		for (i = n - 1; i >= 0; i--) {
			st = xwaitpid(pids[i]);
			snprintf(who, sizeof who, "child %d", i);
			expect_exit(st, i % 7, who);
		}
		free(pids);
	} else {
		for (i = 0; i < n; i++) {
			double t0, t1;
			pid_t pid;

			fflush(stdout);
			t0 = now_us();
			pid = fork();
			if (pid < 0)
				DIE_ERRNO("fork");
			if (pid == 0)
				_exit(i % 7);
			st = xwaitpid(pid);
			t1 = now_us();
			snprintf(who, sizeof who, "child %d", i);
			expect_exit(st, i % 7, who);
			printf("fork_wait_us=%.3f\n", t1 - t0);
		}
	}
	if (waitpid(-1, &st, 0) != -1 || errno != ECHILD)
		die("waitpid(-1) with no children left did not fail with ECHILD");
	printf("ok %d children\n", n);
	return 0;
}
