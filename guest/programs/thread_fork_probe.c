/*
 * thread_fork_probe — small probes of process identity, lifetime, clone and
 * signals, one per mode (argv[1]).  Children never use stdio (in the
 * thread-fork VM the stdio buffers are globals shared with the parent): they
 * report through pipes, exit statuses, or write(2) of a formatted line.
 *
 *   ids           prints "pid=<getpid()> ppid=<getppid()>".
 *                 Thread-fork VM: "pid=2 ppid=1" (init is pid 1).
 *   orphan_ppid   P forks C, C forks G and exits 0; P reaps C, then tells G
 *                 (over a pipe) to look; G sends back its getppid().
 *                 Output: "grandchild_ppid=<n>" and "reparented=yes".
 *                 Thread-fork VM: n = 1 (G was adopted by init).  Natively n
 *                 is init's or a subreaper's pid, never C's.
 *   exit_early    P forks C and exits 3 at once, still holding the write end
 *                 of a pipe C reads; C sees EOF only once P has exited, then
 *                 writes "child <pid>: parent gone, ppid=<n>, exiting 0" with
 *                 write(2) and exits 0.  Output: "parent exits 3" (from P),
 *                 then the child's line.  Thread-fork VM: n = 1.
 *   wait_deadlock P makes a pipe and forks C; C closes its write end and
 *                 reads the pipe, P waits for C: P holds the only write end
 *                 and never writes, so neither can go on.  Output before
 *                 hanging: "parent waits for a child that reads a pipe nobody
 *                 writes".  Natively it hangs forever: VM only.
 *   clone_vm      syscall(SYS_clone, CLONE_VM | SIGCHLD, 0, 0, 0, 0) and
 *                 prints "clone(CLONE_VM|SIGCHLD)=<ret> errno=<name>".
 *                 Thread-fork VM: "=-1 errno=ENOSYS".  VM only: natively the
 *                 child would share the parent's memory and stack.
 *   clone_fork    syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0), like fork(): the
 *                 child sends its getpid() over a pipe and exits 42.
 *                 Output: "clone(SIGCHLD): returned the child's pid",
 *                         "clone(SIGCHLD): child exited 42".
 *                 Thread-fork VM: identical output.
 *   exit_codes    forks 100 children; child i (0..99) exits with i + 1; the
 *                 parent reaps them with wait() in whatever order they come
 *                 and checks each status against the pid's own code, then
 *                 that wait() fails with ECHILD.  Output: "reaped 100
 *                 children, each with its own exit code".  Thread-fork VM:
 *                 identical output.
 *   sigusr1       installs a SIGUSR1 handler with sigaction(), raise(SIGUSR1),
 *                 then checks sigpending().  Output:
 *                 "handler_ran=<0|1> pending_usr1=<0|1>", "still running".
 *                 handler_ran=1 pending_usr1=0 natively and in every
 *                 fork mode.
 * Exit status 0 except exit_early (3); a bad mode prints usage, exits 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "thread_fork_probe"

#include "guest_common.h"

static int mode_ids(void)
{
	printf("pid=%d ppid=%d\n", (int)getpid(), (int)getppid());
	return 0;
}

static int mode_orphan_ppid(void)
{
	int go[2], rep[2], st;
	pid_t child, me, ppid;
	char c;

	xpipe(go);
	xpipe(rep);
	child = xfork();
	if (child == 0) {
		me = getpid();
		close(rep[0]);
		close(go[1]);
		if (xfork() == 0) {
			if (read_full(go[0], &c, 1) != 1)
				die("grandchild: go pipe closed early");
			ppid = getppid();
			if (ppid == me)
				ppid = -1; /* still the exited child's pid: not re-parented */
			write_full(rep[1], &ppid, sizeof ppid);
			_exit(0);
		}
		_exit(0);
	}
	close(go[0]);
	close(rep[1]);
	st = xwaitpid(child);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		die("child: wait status 0x%x", st);
	write_full(go[1], "g", 1);
	close(go[1]);
	if (read_full(rep[0], &ppid, sizeof ppid) != sizeof ppid)
		die("no report from the grandchild");
	if (read_full(rep[0], &c, 1) != 0)
		die("extra data from the grandchild");
	close(rep[0]);
	printf("grandchild_ppid=%d\n", (int)ppid);
	printf("reparented=%s\n", ppid > 0 ? "yes" : "no");
	return 0;
}

static int mode_exit_early(void)
{
	int p[2];
	char c, line[128];
	int n;

	xpipe(p);
	if (xfork() == 0) {
		close(p[1]);
		if (read_full(p[0], &c, 1) != 0)
			_exit(5);
		n = snprintf(line, sizeof line, "child %d: parent gone, ppid=%d, exiting 0\n",
			     (int)getpid(), (int)getppid());
		write_full(1, line, (size_t)n);
		_exit(0);
	}
	close(p[0]);
	printf("parent exits 3\n");
	exit(3); /* the write end closes only now */
}

static int mode_wait_deadlock(void)
{
	int p[2];
	pid_t child;
	char c;

	xpipe(p);
	printf("parent waits for a child that reads a pipe nobody writes\n");
	child = xfork();
	if (child == 0) {
		close(p[1]);
		if (read(p[0], &c, 1) >= 0)
			_exit(0);
		_exit(1);
	}
	close(p[0]);
	xwaitpid(child); /* never returns: we hold the write end */
	die("the deadlock ended");
}

static int mode_clone_vm(void)
{
	long r = syscall(SYS_clone, CLONE_VM | SIGCHLD, 0, 0, 0, 0);
	int e = get_errno();

	if (r == 0)
		_exit(0); /* not reached unless the kernel supports CLONE_VM */
	printf("clone(CLONE_VM|SIGCHLD)=%ld errno=%s\n", r, r < 0 ? errname(e) : "0");
	if (r > 0)
		xwaitpid((pid_t)r);
	return 0;
}

static int mode_clone_fork(void)
{
	int p[2], st;
	pid_t reported;
	long r;

	xpipe(p);
	fflush(stdout);
	r = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
	if (r < 0)
		die("clone(SIGCHLD): %s", strerror(get_errno()));
	if (r == 0) {
		pid_t me = (pid_t)syscall(SYS_getpid);

		close(p[0]);
		write_full(p[1], &me, sizeof me);
		_exit(42);
	}
	close(p[1]);
	if (read_full(p[0], &reported, sizeof reported) != sizeof reported)
		die("no pid from the clone child");
	close(p[0]);
	if (reported != (pid_t)r)
		die("clone returned %ld but the child's getpid() is %d", r, (int)reported);
	printf("clone(SIGCHLD): returned the child's pid\n");
	st = xwaitpid((pid_t)r);
	if (!WIFEXITED(st))
		die("clone child: wait status 0x%x", st);
	printf("clone(SIGCHLD): child exited %d\n", WEXITSTATUS(st));
	return 0;
}

#define NCODES 100

static int mode_exit_codes(void)
{
	pid_t pids[NCODES], r;
	int seen[NCODES] = { 0 }, st, i, j;

	for (i = 0; i < NCODES; i++) {
		pids[i] = xfork();
		if (pids[i] == 0)
			_exit(i + 1);
	}
	for (j = 0; j < NCODES; j++) {
		do
			r = wait(&st);
		while (r < 0 && get_errno() == EINTR);
		if (r < 0)
			die("wait: %s after %d children", strerror(get_errno()), j);
		for (i = 0; i < NCODES && pids[i] != r; i++)
			;
		if (i == NCODES || seen[i])
			die("wait returned pid %d: not an unreaped child", (int)r);
		seen[i] = 1;
		if (!WIFEXITED(st) || WEXITSTATUS(st) != i + 1)
			die("child %d (pid %d): wait status 0x%x, expected exit %d", i, (int)r, st,
			    i + 1);
	}
	if (wait(&st) != -1 || get_errno() != ECHILD)
		die("wait after the last child did not fail with ECHILD");
	printf("reaped %d children, each with its own exit code\n", NCODES);
	return 0;
}

static volatile sig_atomic_t handler_ran;

static void on_usr1(int sig)
{
	(void)sig;
	handler_ran = 1;
}

static int mode_sigusr1(void)
{
	struct sigaction sa;
	sigset_t set;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0)
		die("sigaction: %s", strerror(get_errno()));
	if (raise(SIGUSR1) != 0)
		die("raise: %s", strerror(get_errno()));
	sigemptyset(&set);
	if (sigpending(&set) != 0)
		die("sigpending: %s", strerror(get_errno()));
	printf("handler_ran=%d pending_usr1=%d\n", (int)handler_ran, sigismember(&set, SIGUSR1));
	printf("still running\n");
	return 0;
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*fn)(void);
	} modes[] = {
		{ "ids", mode_ids },
		{ "orphan_ppid", mode_orphan_ppid },
		{ "exit_early", mode_exit_early },
		{ "wait_deadlock", mode_wait_deadlock },
		{ "clone_vm", mode_clone_vm },
		{ "clone_fork", mode_clone_fork },
		{ "exit_codes", mode_exit_codes },
		{ "sigusr1", mode_sigusr1 },
	};

	top_pid = getpid();
	for (size_t i = 0; argc == 2 && i < sizeof modes / sizeof modes[0]; i++)
		if (strcmp(argv[1], modes[i].name) == 0)
			return modes[i].fn();
	fprintf(stderr, "usage: %s ids|orphan_ppid|exit_early|wait_deadlock|clone_vm|"
		"clone_fork|exit_codes|sigusr1\n", argv[0]);
	return 2;
}
