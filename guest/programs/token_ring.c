/*
 * token_ring — N processes in a ring of pipes pass a token around.
 *
 * Checks: process 0 (the parent) and N-1 children (-n N, default 8) are
 * connected by N pipes, process i writing to process (i+1) % N.  The token
 * goes round -r R times (default 10); every process increments it, and every
 * child checks that it receives exactly the value it expects.  After the last
 * round the parent closes its write end and EOF propagates around the ring
 * (each child checks it sees EOF, then exits 0); the parent reaps every
 * child with status 0.
 *
 * Output:      token=<N*R>           (token=80 by default)
 * Thread-fork VM: identical output.
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

#define PROG "token_ring"

#include "guest_common.h"

int main(int argc, char **argv)
{
	int n = 8, rounds = 10, opt, i, r, k;
	int (*p)[2];
	pid_t *pids;
	uint32_t token = 0;
	char who[64];

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "n:r:")) != -1) {
		switch (opt) {
		case 'n': n = atoi(optarg); break;
		case 'r': rounds = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-n processes] [-r rounds]\n", argv[0]);
			return 2;
		}
	}
	if (n < 1 || rounds < 0)
		die("bad arguments");
	p = malloc(sizeof *p * (size_t)n);
	pids = malloc(sizeof *pids * (size_t)n);
	if (!p || !pids)
		die("malloc failed");
	/* pipe i carries the token from process i to process (i+1) % n */
	for (i = 0; i < n; i++)
		xpipe(p[i]);

	for (i = 1; i < n; i++) {
		pid_t pid = xfork();
		if (pid == 0) {
			int in = p[i - 1][0], out = p[i][1];
			uint32_t t;
			char extra;

			for (k = 0; k < n; k++) {
				if (p[k][0] != in)
					xclose(p[k][0]);
				if (p[k][1] != out)
					xclose(p[k][1]);
			}
			for (r = 0; r < rounds; r++) {
				read_exact(in, &t, sizeof t, "token");
				if (t != (uint32_t)(r * n + i))
					die("process %d round %d: got token %u, expected %d", i, r,
					    t, r * n + i);
				t++;
				write_full(out, &t, sizeof t);
			}
			if (read_full(in, &extra, 1) != 0)
				die("process %d: data after the last round", i);
			xclose(in);
			xclose(out);
			_exit(0);
		}
		pids[i] = pid;
	}
	for (k = 0; k < n; k++) {
		if (k != n - 1)
			xclose(p[k][0]);
		if (k != 0)
			xclose(p[k][1]);
	}
	for (r = 0; r < rounds; r++) {
		token++;
		write_full(p[0][1], &token, sizeof token);
		read_exact(p[n - 1][0], &token, sizeof token, "token");
		if (token != (uint32_t)((r + 1) * n))
			die("round %d: token came back as %u, expected %d", r, token, (r + 1) * n);
	}
	xclose(p[0][1]);
	{
		char extra;
		if (read_full(p[n - 1][0], &extra, 1) != 0)
			die("data after the last round");
	}
	xclose(p[n - 1][0]);
	for (i = 1; i < n; i++) {
		snprintf(who, sizeof who, "ring process %d", i);
		expect_exit(xwaitpid(pids[i]), 0, who);
	}
	printf("token=%u\n", token);
	return 0;
}
