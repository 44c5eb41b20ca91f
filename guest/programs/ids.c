/*
 * ids — process identities across fork.
 *
 * Checks: fork()'s return value equals the child's getpid() (sent back over a
 * pipe); the child's getppid() equals the parent's getpid(); gettid() ==
 * getpid() in parent, child and grandchild; the child starts with the
 * parent's errno value and sets its own (EDOM), and the parent's errno is
 * unchanged afterwards; a grandchild's getppid() equals the child's pid; all
 * three pids are distinct; everyone exits 0.  No pid is printed.
 *
 * Output:      ok fork() returned the child's getpid()
 *              ok child getppid() == parent getpid()
 *              ok gettid() == getpid() in parent
 *              ok gettid() == getpid() in child
 *              ok gettid() == getpid() in grandchild
 *              ok grandchild getppid() == child's pid
 *              ok parent, child and grandchild pids distinct
 *              ok child inherited errno and set its own
 *              ok parent errno unchanged by the child
 *              ok child and grandchild exited 0
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

#define PROG "ids"

#include "guest_common.h"

struct idrec {
	int pid, ppid, tid;
	int errno_at_start, errno_after_set;
};

static void send_ids(int fd, int errno_at_start)
{
	struct idrec rec;

	rec.pid = getpid();
	rec.ppid = getppid();
	rec.tid = gettid();
	rec.errno_at_start = errno_at_start;
	set_errno(EDOM);
	rec.errno_after_set = get_errno();
	write_full(fd, &rec, sizeof rec);
}

int main(void)
{
	int p[2], me, st, parent_errno;
	struct idrec c, g;
	pid_t pid;

	top_pid = getpid();
	me = getpid();
	xpipe(p);
	fflush(stdout);
	set_errno(ENOENT); /* the parent's errno, inherited by the child */
	pid = fork();
	if (pid < 0)
		DIE_ERRNO("fork");
	if (pid == 0) {
		int e = get_errno();
		pid_t gpid;

		close(p[0]);
		send_ids(p[1], e);
		gpid = fork();
		if (gpid < 0)
			DIE_ERRNO("fork (grandchild)");
		if (gpid == 0) {
			e = get_errno();
			send_ids(p[1], e);
			_exit(0);
		}
		close(p[1]);
		st = xwaitpid(gpid);
		expect_exit(st, 0, "grandchild");
		_exit(0);
	}
	close(p[1]);
	read_exact(p[0], &c, sizeof c, "child's ids");
	read_exact(p[0], &g, sizeof g, "grandchild's ids");
	st = xwaitpid(pid);
	/* only successful calls since fork(), so errno must still be ENOENT */
	parent_errno = get_errno();

	if (c.pid != (int)pid)
		die("fork() returned %d but the child's getpid() is %d", (int)pid, c.pid);
	printf("ok fork() returned the child's getpid()\n");
	if (c.ppid != me)
		die("child's getppid() %d != parent's getpid() %d", c.ppid, me);
	printf("ok child getppid() == parent getpid()\n");
	if (gettid() != me)
		die("parent: gettid() %d != getpid() %d", (int)gettid(), me);
	printf("ok gettid() == getpid() in parent\n");
	if (c.tid != c.pid)
		die("child: gettid() %d != getpid() %d", c.tid, c.pid);
	printf("ok gettid() == getpid() in child\n");
	if (g.tid != g.pid)
		die("grandchild: gettid() %d != getpid() %d", g.tid, g.pid);
	printf("ok gettid() == getpid() in grandchild\n");
	if (g.ppid != c.pid)
		die("grandchild's getppid() %d != child's pid %d", g.ppid, c.pid);
	printf("ok grandchild getppid() == child's pid\n");
	if (me == c.pid || me == g.pid || c.pid == g.pid || c.pid <= 0 || g.pid <= 0)
		die("pids not distinct: %d %d %d", me, c.pid, g.pid);
	printf("ok parent, child and grandchild pids distinct\n");
	if (c.errno_at_start != ENOENT || c.errno_after_set != EDOM)
		die("child errno: started as %s, after setting EDOM read %s",
		    errname(c.errno_at_start), errname(c.errno_after_set));
	if (g.errno_at_start != EDOM || g.errno_after_set != EDOM)
		die("grandchild errno: started as %s (expected the child's EDOM), then %s",
		    errname(g.errno_at_start), errname(g.errno_after_set));
	printf("ok child inherited errno and set its own\n");
	if (parent_errno != ENOENT)
		die("parent errno changed to %s", errname(parent_errno));
	printf("ok parent errno unchanged by the child\n");
	expect_exit(st, 0, "child");
	printf("ok child and grandchild exited 0\n");
	return 0;
}
