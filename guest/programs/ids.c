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
