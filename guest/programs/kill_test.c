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

/* ---- common helpers (each program is self-contained on purpose) ---- */
static pid_t top_pid; /* the original process: exit() there, _exit() in children */

static __attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, PROG ": ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	/* A child must not run exit(): in the thread-fork VM the stdio buffers
	 * are globals shared with the parent, so exit() would flush the
	 * parent's pending output. */
	if (getpid() == top_pid)
		exit(1);
	_exit(1);
}

/* errno accessors that cannot be optimised across fork().  musl declares
 * __errno_location() __attribute__((const)), so within one function clang
 * computes &errno once, e.g. before fork(), and the child then keeps using
 * that pointer (into the parent's thread descriptor) instead of its own TLS.
 * Going through these noinline functions makes every access use the
 * calling process's own thread pointer. */
static __attribute__((noinline, unused)) int get_errno(void)
{
	return errno;
}

static __attribute__((noinline, unused)) void set_errno(int e)
{
	errno = e;
}

#define DIE_ERRNO(what) die("%s: %s (errno %d)", (what), strerror(errno), errno)

static __attribute__((unused)) pid_t xfork(void)
{
	pid_t pid;

	fflush(stdout); /* never duplicate buffered output into a child */
	pid = fork();
	if (pid < 0)
		DIE_ERRNO("fork");
	return pid;
}

static __attribute__((unused)) void xpipe(int p[2])
{
	if (pipe(p) != 0)
		DIE_ERRNO("pipe");
}

static __attribute__((unused)) void xclose(int fd)
{
	if (close(fd) != 0)
		DIE_ERRNO("close");
}

static __attribute__((unused)) void write_full(int fd, const void *buf, size_t n)
{
	const char *p = buf;

	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			DIE_ERRNO("write");
		}
		p += w;
		n -= (size_t)w;
	}
}

/* Reads until n bytes or EOF; returns the number of bytes read. */
static __attribute__((unused)) size_t read_full(int fd, void *buf, size_t n)
{
	char *p = buf;
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, p + got, n - got);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			DIE_ERRNO("read");
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return got;
}

static __attribute__((unused)) void read_exact(int fd, void *buf, size_t n, const char *what)
{
	size_t got = read_full(fd, buf, n);

	if (got != n)
		die("%s: short read (%zu of %zu bytes)", what, got, n);
}

/* waitpid() for one specific pid, retrying on EINTR; returns the status. */
static __attribute__((unused)) int xwaitpid(pid_t pid)
{
	int status;
	pid_t r;

	do
		r = waitpid(pid, &status, 0);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		DIE_ERRNO("waitpid");
	if (r != pid)
		die("waitpid(%d) returned %d", (int)pid, (int)r);
	return status;
}

static __attribute__((unused)) const char *signame(int sig)
{
	switch (sig) {
	case SIGHUP: return "SIGHUP";
	case SIGINT: return "SIGINT";
	case SIGQUIT: return "SIGQUIT";
	case SIGILL: return "SIGILL";
	case SIGTRAP: return "SIGTRAP";
	case SIGABRT: return "SIGABRT";
	case SIGBUS: return "SIGBUS";
	case SIGFPE: return "SIGFPE";
	case SIGKILL: return "SIGKILL";
	case SIGUSR1: return "SIGUSR1";
	case SIGSEGV: return "SIGSEGV";
	case SIGUSR2: return "SIGUSR2";
	case SIGPIPE: return "SIGPIPE";
	case SIGALRM: return "SIGALRM";
	case SIGTERM: return "SIGTERM";
	case SIGCHLD: return "SIGCHLD";
	default: return "SIG?";
	}
}

static __attribute__((unused)) const char *errname(int e)
{
	switch (e) {
	case 0: return "0";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case ESRCH: return "ESRCH";
	case EINTR: return "EINTR";
	case EBADF: return "EBADF";
	case ECHILD: return "ECHILD";
	case EAGAIN: return "EAGAIN";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	case EFAULT: return "EFAULT";
	case EINVAL: return "EINVAL";
	case EMFILE: return "EMFILE";
	case ENFILE: return "ENFILE";
	case EPIPE: return "EPIPE";
	case EDOM: return "EDOM";
	case ERANGE: return "ERANGE";
	case ENOSYS: return "ENOSYS";
	default: return "E?";
	}
}

/* Describes a wait status for error messages. */
static __attribute__((unused)) const char *describe_status(int st)
{
	static char buf[64];

	if (WIFEXITED(st))
		snprintf(buf, sizeof buf, "exited %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, sizeof buf, "killed by %s (%d)", signame(WTERMSIG(st)), WTERMSIG(st));
	else
		snprintf(buf, sizeof buf, "status 0x%x", st);
	return buf;
}

static __attribute__((unused)) void expect_exit(int st, int code, const char *who)
{
	if (!WIFEXITED(st) || WEXITSTATUS(st) != code)
		die("%s: expected exit status %d, got %s", who, code, describe_status(st));
}

static __attribute__((unused)) void expect_signal(int st, int sig, const char *who)
{
	if (!WIFSIGNALED(st) || WTERMSIG(st) != sig)
		die("%s: expected death by %s, got %s", who, signame(sig), describe_status(st));
}
/* ---- end of common helpers ---- */

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
