/*
 * sigpipe — writing to a pipe whose read end is closed everywhere.
 *
 * Checks:
 *   case A: the parent (the only reader) closes its read end, then lets the
 *           writer child write: the child is killed by SIGPIPE, the parent
 *           sees WIFSIGNALED && WTERMSIG == SIGPIPE;
 *   case B: the same, but the child first does signal(SIGPIPE, SIG_IGN):
 *           write() returns -1 with errno EPIPE (reported over a pipe) and
 *           the child exits 0;
 *   the child's signal(SIGPIPE, SIG_IGN) did not change the parent's
 *   disposition, which is still SIG_DFL.
 *
 * Output:      case A: writer killed by SIGPIPE
 *              case B: write returned -1 errno=EPIPE
 *              parent SIGPIPE disposition still SIG_DFL
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

#define PROG "sigpipe"

#include "guest_common.h"

/* Runs one case; returns the child's wait status. */
static int run_case(int ignore, int *result)
{
	int data[2], go[2], rep[2], st;
	pid_t pid;
	char c;

	xpipe(data);
	xpipe(go);
	xpipe(rep);
	pid = xfork();
	if (pid == 0) {
		int res[2];
		ssize_t w;

		xclose(data[0]);
		xclose(go[1]);
		xclose(rep[0]);
		if (ignore && signal(SIGPIPE, SIG_IGN) == SIG_ERR)
			DIE_ERRNO("signal");
		/* wait until the reader is gone */
		if (read_full(go[0], &c, 1) != 1)
			die("child: go pipe closed early");
		w = write(data[1], "x", 1);
		res[0] = (int)w;
		res[1] = w < 0 ? get_errno() : 0;
		write_full(rep[1], res, sizeof res);
		_exit(0);
	}
	xclose(go[0]);
	xclose(rep[1]);
	xclose(data[1]);
	xclose(data[0]); /* the last reader is gone */
	write_full(go[1], "g", 1);
	xclose(go[1]);
	result[0] = result[1] = 0;
	if (read_full(rep[0], result, 2 * sizeof(int)) == 0)
		result[0] = -2; /* the child died before reporting */
	xclose(rep[0]);
	st = xwaitpid(pid);
	(void)c;
	return st;
}

int main(void)
{
	int st, res[2];
	struct sigaction sa;

	top_pid = getpid();

	st = run_case(0, res);
	if (res[0] != -2)
		die("case A: the child survived its write (write returned %d, errno %s)", res[0],
		    errname(res[1]));
	expect_signal(st, SIGPIPE, "case A writer");
	printf("case A: writer killed by SIGPIPE\n");

	st = run_case(1, res);
	expect_exit(st, 0, "case B writer");
	if (res[0] != -1 || res[1] != EPIPE)
		die("case B: write returned %d errno %s, expected -1 EPIPE", res[0], errname(res[1]));
	printf("case B: write returned %d errno=%s\n", res[0], errname(res[1]));

	if (sigaction(SIGPIPE, NULL, &sa) != 0)
		DIE_ERRNO("sigaction");
	if (sa.sa_handler != SIG_DFL)
		die("the child's signal(SIGPIPE, SIG_IGN) changed the parent's disposition");
	printf("parent SIGPIPE disposition still SIG_DFL\n");
	return 0;
}
