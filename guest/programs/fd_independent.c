/*
 * fd_independent — parent and child have independent fd tables.
 *
 * Checks: the child closes its copies of both ends of pipe P (and sees
 * EBADF when it writes to the closed fd); the parent's copies of P stay open:
 * it writes "ping" into P and reads it back.  Conversely, the parent closes
 * its copies of both ends of pipe Q, and the child can still write "pong"
 * into its own copy of Q and read it back.  The child exits 0.
 *
 * Output:      child closed its copy of both ends (write there: EBADF)
 *              parent's pipe still works: read "ping"
 *              parent closed its copy of both ends of a second pipe
 *              child's pipe still works: read "pong"
 *              reaped child, status 0
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

#define PROG "fd_independent"

#include "guest_common.h"

int main(void)
{
	int P[2], Q[2], go[2], rep[2];
	char buf[8], c;
	pid_t pid;

	top_pid = getpid();
	xpipe(P);
	xpipe(Q);
	xpipe(go);
	xpipe(rep);
	pid = xfork();
	if (pid == 0) {
		xclose(go[1]);
		xclose(rep[0]);
		xclose(P[0]);
		xclose(P[1]);
		if (write(P[1], "x", 1) != -1 || get_errno() != EBADF)
			die("child: write to its closed fd did not fail with EBADF");
		write_full(rep[1], "c", 1);
		/* wait until the parent has closed its copies of Q */
		if (read_full(go[0], &c, 1) != 1)
			die("child: go pipe closed early");
		write_full(Q[1], "pong", 4);
		read_exact(Q[0], buf, 4, "pong");
		if (memcmp(buf, "pong", 4) != 0)
			die("child: read back %.4s", buf);
		write_full(rep[1], "q", 1);
		_exit(0);
	}
	xclose(go[0]);
	xclose(rep[1]);
	read_exact(rep[0], &c, 1, "child's report");
	if (c != 'c')
		die("unexpected report %c", c);
	printf("child closed its copy of both ends (write there: EBADF)\n");
	write_full(P[1], "ping", 4);
	read_exact(P[0], buf, 4, "ping");
	if (memcmp(buf, "ping", 4) != 0)
		die("parent: read back %.4s", buf);
	printf("parent's pipe still works: read \"ping\"\n");
	xclose(Q[0]);
	xclose(Q[1]);
	printf("parent closed its copy of both ends of a second pipe\n");
	write_full(go[1], "g", 1);
	read_exact(rep[0], &c, 1, "child's report");
	if (c != 'q')
		die("unexpected report %c", c);
	printf("child's pipe still works: read \"pong\"\n");
	expect_exit(xwaitpid(pid), 0, "child");
	printf("reaped child, status 0\n");
	return 0;
}
