/*
 * nested_fork — a process tree of depth 3 and fan-out 3.
 *
 * Checks: every inner node forks 3 children and waitpid()s each of them in
 * turn; leaf number i (0..26, its path read as a base-3 number) exits with
 * i + 1; every inner node checks each child's exit status against the sum of
 * the leaf codes in that child's subtree, and exits with the sum of its own
 * subtree (at most 207, so it fits an exit status).  The root checks its
 * total: 1 + 2 + ... + 27.
 *
 * Output:      leaves=27 total=378
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

#define PROG "nested_fork"
#define DEPTH 3
#define FANOUT 3

#include "guest_common.h"

/* Sum of the leaf codes in the subtree of the node at `level` with path `idx`. */
static int expected(int level, int idx)
{
	int sum = 0;

	if (level == DEPTH)
		return idx + 1;
	for (int c = 0; c < FANOUT; c++)
		sum += expected(level + 1, idx * FANOUT + c);
	return sum;
}

static int node(int level, int idx)
{
	pid_t kids[FANOUT];
	int sum = 0;
	char who[64];

	if (level == DEPTH)
		return idx + 1;
	for (int c = 0; c < FANOUT; c++) {
		kids[c] = xfork();
		if (kids[c] == 0)
			_exit(node(level + 1, idx * FANOUT + c));
	}
	for (int c = 0; c < FANOUT; c++) {
		int st = xwaitpid(kids[c]);
		int want = expected(level + 1, idx * FANOUT + c);

		snprintf(who, sizeof who, "node level %d path %d", level + 1, idx * FANOUT + c);
		expect_exit(st, want, who);
		sum += want;
	}
	return sum;
}

int main(void)
{
	int total, leaves = 1;

	top_pid = getpid();
	for (int l = 0; l < DEPTH; l++)
		leaves *= FANOUT;
	total = node(0, 0);
	if (total != expected(0, 0) || total != leaves * (leaves + 1) / 2)
		die("total %d, expected %d", total, leaves * (leaves + 1) / 2);
	printf("leaves=%d total=%d\n", leaves, total);
	return 0;
}
