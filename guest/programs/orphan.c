/*
 * orphan — a grandchild outlives its parent and is re-parented.
 *
 * Checks: the program (P) forks a child (C), which saves its own pid, forks
 * a grandchild (G) and exits 0.  P reaps C (status 0); only then -- when C
 * has certainly finished exiting -- P tells G over a pipe to look; G reports
 * over a second pipe whether getppid() is no longer C's pid.  (G cannot use
 * its own early getppid() as the reference: C may be gone before G first
 * runs.  Natively G may be adopted by init or by a subreaper, so only yes/no
 * is reported, never a pid.)  P reads the report until EOF (G has exited;
 * G's zombie is reaped by whoever adopted it).
 *
 * Output:      child exited 0 and was reaped
 *              reparented=yes
 * Thread-fork VM: identical output (G is adopted by the VM's init, pid 1).
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

#define PROG "orphan"

#include "guest_common.h"

int main(void)
{
	int go[2], rep[2];
	char c, answer;
	pid_t child;

	top_pid = getpid();
	xpipe(go);
	xpipe(rep);
	child = xfork();
	if (child == 0) {
		pid_t g, me = getpid();

		xclose(rep[0]);
		xclose(go[1]);
		g = xfork();
		if (g == 0) {
			if (read_full(go[0], &c, 1) != 1)
				die("grandchild: go pipe closed early");
			answer = getppid() != me ? 'y' : 'n';
			write_full(rep[1], &answer, 1);
			_exit(0);
		}
		_exit(0);
	}
	xclose(go[0]);
	xclose(rep[1]);
	expect_exit(xwaitpid(child), 0, "child");
	printf("child exited 0 and was reaped\n");
	write_full(go[1], "g", 1);
	xclose(go[1]);
	if (read_full(rep[0], &answer, 1) != 1)
		die("no report from the grandchild");
	if (read_full(rep[0], &c, 1) != 0)
		die("extra data from the grandchild");
	xclose(rep[0]);
	printf("reparented=%s\n", answer == 'y' ? "yes" : "no");
	if (answer != 'y')
		die("the grandchild was not re-parented after its parent exited");
	return 0;
}
