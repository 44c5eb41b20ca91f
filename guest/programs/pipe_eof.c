/*
 * pipe_eof — read() returns 0 (EOF) only once the LAST write end is closed.
 *
 * Checks: the parent and two children A and B all hold the write end of a
 * data pipe.  Step by step, driven by command pipes (no timing):
 *   1. the parent closes its own write end (A and B still hold theirs);
 *   2. A writes a message, closes its write end and reports; the parent then
 *      reads A's message: data written before the close is still delivered;
 *   3. B writes a message while keeping its write end; the parent's blocking
 *      read returns that message, not EOF (one writer is enough);
 *   4. the parent tells B to close and immediately does a blocking read: it
 *      returns 0 only after B (the last writer) closed, which B confirms;
 *   5. both children are reaped with status 0.
 *
 * Output:      writers: parent, A, B
 *              parent closed its write end
 *              A wrote "hello from A" and closed its write end
 *              parent read "hello from A"
 *              parent read "hello from B" (B still holds its write end)
 *              parent read returned 0 (EOF) after B, the last writer, closed
 *              reaped A and B: status 0
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

#define PROG "pipe_eof"

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

static int data[2], ctl_a[2], ctl_b[2], report[2];

static void child(const char *name, int ctl_read)
{
	char cmd, msg[32];
	int len = snprintf(msg, sizeof msg, "hello from %s", name);

	xclose(data[0]);
	xclose(report[0]);
	for (;;) {
		if (read_full(ctl_read, &cmd, 1) != 1)
			die("%s: command pipe closed early", name);
		switch (cmd) {
		case 'w': /* write a message, keep the write end */
			write_full(data[1], msg, (size_t)len);
			write_full(report[1], "w", 1);
			break;
		case 'c': /* close the write end, report, exit */
			xclose(data[1]);
			write_full(report[1], name, 1);
			_exit(0);
		default:
			die("%s: bad command %c", name, cmd);
		}
	}
}

int main(void)
{
	pid_t a, b;
	char buf[64], rep;
	ssize_t r;

	top_pid = getpid();
	xpipe(data);
	xpipe(report);
	xpipe(ctl_a);
	a = xfork();
	if (a == 0) {
		xclose(ctl_a[1]);
		child("A", ctl_a[0]);
	}
	xclose(ctl_a[0]);
	xpipe(ctl_b);
	b = xfork();
	if (b == 0) {
		xclose(ctl_a[1]);
		xclose(ctl_b[1]);
		child("B", ctl_b[0]);
	}
	xclose(ctl_b[0]);
	xclose(report[1]);
	printf("writers: parent, A, B\n");

	/* 1 */
	xclose(data[1]);
	printf("parent closed its write end\n");

	/* 2 */
	write_full(ctl_a[1], "wc", 2);
	read_exact(report[0], &rep, 1, "A's report");
	if (rep != 'w')
		die("unexpected report %c from A", rep);
	read_exact(report[0], &rep, 1, "A's report");
	if (rep != 'A')
		die("unexpected report %c from A", rep);
	printf("A wrote \"hello from A\" and closed its write end\n");
	r = read(data[0], buf, sizeof buf - 1);
	if (r < 0)
		DIE_ERRNO("read");
	if (r == 0)
		die("read returned EOF although B still holds the write end");
	buf[r] = '\0';
	if (strcmp(buf, "hello from A") != 0)
		die("read \"%s\", expected A's message", buf);
	printf("parent read \"%s\"\n", buf);

	/* 3: B writes, but keeps its write end */
	write_full(ctl_b[1], "w", 1);
	r = read(data[0], buf, sizeof buf - 1);
	if (r < 0)
		DIE_ERRNO("read");
	if (r == 0)
		die("read returned EOF although B still holds the write end");
	buf[r] = '\0';
	if (strcmp(buf, "hello from B") != 0)
		die("read \"%s\", expected B's message", buf);
	read_exact(report[0], &rep, 1, "B's report");
	if (rep != 'w')
		die("unexpected report %c from B", rep);
	printf("parent read \"%s\" (B still holds its write end)\n", buf);

	/* 4: B closes; our blocking read can only return 0 after that */
	write_full(ctl_b[1], "c", 1);
	r = read(data[0], buf, sizeof buf - 1);
	if (r < 0)
		DIE_ERRNO("read");
	if (r != 0)
		die("read returned %zd bytes after B's message, expected EOF", r);
	read_exact(report[0], &rep, 1, "B's report");
	if (rep != 'B')
		die("unexpected report %c from B", rep);
	printf("parent read returned 0 (EOF) after B, the last writer, closed\n");
	if (read_full(report[0], &rep, 1) != 0)
		die("extra report %c", rep);

	/* 5 */
	expect_exit(xwaitpid(a), 0, "A");
	expect_exit(xwaitpid(b), 0, "B");
	printf("reaped A and B: status 0\n");
	return 0;
}
