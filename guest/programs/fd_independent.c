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
