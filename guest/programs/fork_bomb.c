/*
 * fork_bomb — fork until fork() fails (or a cap is reached), then clean up.
 *
 * Checks: the parent forks children that all block reading one pipe, until
 * fork() fails or -n MAX children (default 64) exist.  A failing fork() must
 * fail cleanly with EAGAIN or ENOMEM.  Then the parent closes the pipe's
 * write end (every child sees EOF and exits 0), reaps children with wait()
 * until ECHILD, and checks it reaped exactly as many as it forked, all with
 * status 0.  (Natively keep -n small: a real fork bomb is dangerous.)
 *
 * Output:      reached max                        (or: fork failed errno=EAGAIN|ENOMEM)
 *              forked=<k>
 *              reaped=<k>
 * Native default: "reached max", "forked=64", "reaped=64".
 * Thread-fork VM: identical for a cap the VM can hold; with a large -n the
 * VM runs out of memory first and prints "fork failed errno=..." and its k.
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

#define PROG "fork_bomb"

#include "guest_common.h"

int main(int argc, char **argv)
{
	long max = 64, forked = 0, reaped = 0;
	int opt, p[2], st, fork_errno = 0;
	pid_t r;

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "n:")) != -1) {
		switch (opt) {
		case 'n': max = atol(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-n MAX]\n", argv[0]);
			return 2;
		}
	}
	if (max < 0)
		die("bad -n %ld", max);
	xpipe(p);
	fflush(stdout);
	while (forked < max) {
		pid_t pid = fork();

		if (pid < 0) {
			fork_errno = errno;
			break;
		}
		if (pid == 0) {
			char c;

			close(p[1]);
			if (read_full(p[0], &c, 1) != 0)
				_exit(5);
			_exit(0);
		}
		forked++;
	}
	if (fork_errno == 0)
		printf("reached max\n");
	else if (fork_errno == EAGAIN || fork_errno == ENOMEM)
		printf("fork failed errno=%s\n", errname(fork_errno));
	else
		die("fork failed with unexpected errno %d (%s)", fork_errno, strerror(fork_errno));
	printf("forked=%ld\n", forked);
	fflush(stdout);
	xclose(p[1]);
	xclose(p[0]);
	for (;;) {
		r = wait(&st);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				break;
			DIE_ERRNO("wait");
		}
		expect_exit(st, 0, "blocked child");
		reaped++;
	}
	if (reaped != forked)
		die("reaped %ld children but forked %ld", reaped, forked);
	printf("reaped=%ld\n", reaped);
	return 0;
}
