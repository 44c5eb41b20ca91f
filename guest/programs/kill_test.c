/*
 * kill_test — kill() on a child and on a process group.
 *
 * Checks: kill(child, 0) == 0 while the child lives (blocked on a pipe);
 * kill(child, SIGTERM) ends it (WIFSIGNALED, SIGTERM); once reaped,
 * kill(pid, 0) == -1 with ESRCH.  Process groups: child 1 does setpgid(0, 0)
 * (a new group, pgid = its pid), child 2 joins it with setpgid(0, pgid);
 * getpgid() agrees in the children and in the parent, the parent stays in
 * its own group; kill(-pgid, SIGKILL) ends both children (SIGKILL) and not
 * the parent; afterwards kill(-pgid, 0) == -1 with ESRCH.
 *
 * Output:      kill(child, 0) = 0 while child alive
 *              kill(child, SIGTERM): WIFSIGNALED sig=SIGTERM
 *              kill(reaped child, 0) = -1 ESRCH
 *              setpgid: both children in a new group, parent not
 *              kill(-pgid, SIGKILL): both children WIFSIGNALED sig=SIGKILL
 *              kill(-pgid, 0) = -1 ESRCH after reaping
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

#define PROG "kill_test"

#include "guest_common.h"

/* A child that joins process group `pgid` (0: a new one), reports its
 * getpgid(0) and then blocks until the hold pipe is closed. */
static pid_t group_child(pid_t pgid, int hold[2], int rep[2])
{
	pid_t pid = xfork();

	if (pid == 0) {
		int g;
		char c;

		close(hold[1]);
		close(rep[0]);
		if (setpgid(0, pgid) != 0)
			DIE_ERRNO("setpgid");
		g = (int)getpgid(0);
		write_full(rep[1], &g, sizeof g);
		(void)read_full(hold[0], &c, 1);
		_exit(0);
	}
	return pid;
}

int main(void)
{
	int hold[2], rep[2], st, g1, g2;
	pid_t pid, c1, c2, pgid, mypg;
	char c;

	top_pid = getpid();

	/* a single child */
	xpipe(hold);
	pid = xfork();
	if (pid == 0) {
		close(hold[1]);
		(void)read_full(hold[0], &c, 1);
		_exit(0);
	}
	xclose(hold[0]);
	if (kill(pid, 0) != 0)
		DIE_ERRNO("kill(child, 0)");
	printf("kill(child, 0) = 0 while child alive\n");
	if (kill(pid, SIGTERM) != 0)
		DIE_ERRNO("kill(child, SIGTERM)");
	st = xwaitpid(pid);
	expect_signal(st, SIGTERM, "child");
	printf("kill(child, SIGTERM): WIFSIGNALED sig=%s\n", signame(WTERMSIG(st)));
	xclose(hold[1]);
	if (kill(pid, 0) != -1 || errno != ESRCH)
		die("kill(reaped child, 0) did not fail with ESRCH");
	printf("kill(reaped child, 0) = -1 ESRCH\n");

	/* process groups */
	mypg = getpgid(0);
	if (mypg < 0)
		DIE_ERRNO("getpgid(0)");
	if (getpgid(getpid()) != mypg)
		die("getpgid(getpid()) != getpgid(0)");
	xpipe(hold);
	xpipe(rep);
	c1 = group_child(0, hold, rep);
	read_exact(rep[0], &g1, sizeof g1, "child 1's pgid");
	pgid = c1;
	c2 = group_child(pgid, hold, rep);
	read_exact(rep[0], &g2, sizeof g2, "child 2's pgid");
	if (g1 != (int)pgid || g2 != (int)pgid)
		die("children report pgids %d and %d, expected %d", g1, g2, (int)pgid);
	if (getpgid(c1) != pgid || getpgid(c2) != pgid)
		die("parent sees pgids %d and %d, expected %d", (int)getpgid(c1),
		    (int)getpgid(c2), (int)pgid);
	if (getpgid(0) != mypg || mypg == pgid)
		die("the parent's process group changed");
	printf("setpgid: both children in a new group, parent not\n");
	if (kill(-pgid, SIGKILL) != 0)
		DIE_ERRNO("kill(-pgid, SIGKILL)");
	expect_signal(xwaitpid(c1), SIGKILL, "group child 1");
	expect_signal(xwaitpid(c2), SIGKILL, "group child 2");
	printf("kill(-pgid, SIGKILL): both children WIFSIGNALED sig=SIGKILL\n");
	xclose(hold[0]);
	xclose(hold[1]);
	xclose(rep[0]);
	xclose(rep[1]);
	if (kill(-pgid, 0) != -1 || errno != ESRCH)
		die("kill(-pgid, 0) after reaping did not fail with ESRCH");
	printf("kill(-pgid, 0) = -1 ESRCH after reaping\n");
	return 0;
}
