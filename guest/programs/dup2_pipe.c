/*
 * dup2_pipe — a child's stdout redirected into a pipe with dup2().
 *
 * Checks: the child dup2()s the pipe's write end onto fd 1, printf()s five
 * lines (stdio, not raw write), fflush()es and exit()s; the parent reads the
 * pipe to EOF, checks it got exactly the expected lines, prints each with a
 * prefix and checks the child's exit status 0.
 *
 * Output:      from child: line 1 of 5: stdout is a pipe now
 *              from child: line 2 of 5: printed with printf
 *              from child: line 3 of 5: 0x2a 42 -42
 *              from child: line 4 of 5: xxxxxxxx...  (100 x)
 *              from child: line 5 of 5: last line
 *              child exited 0
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

#define PROG "dup2_pipe"

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
	int p[2], st, lines = 0;
	size_t len = 0, cap = 4096;
	char *buf, *line, *nl;
	pid_t pid;

	top_pid = getpid();
	xpipe(p);
	pid = xfork();
	if (pid == 0) {
		char xs[101];

		close(p[0]);
		if (dup2(p[1], 1) != 1)
			DIE_ERRNO("dup2");
		close(p[1]);
		memset(xs, 'x', 100);
		xs[100] = '\0';
		printf("line %d of %d: %s\n", 1, 5, "stdout is a pipe now");
		printf("line %d of %d: %s\n", 2, 5, "printed with printf");
		printf("line %d of %d: %#x %d %d\n", 3, 5, 42, 42, -42);
		printf("line %d of %d: %s\n", 4, 5, xs);
		printf("line %d of %d: %s\n", 5, 5, "last line");
		if (fflush(stdout) != 0)
			_exit(3);
		exit(0);
	}
	xclose(p[1]);
	buf = malloc(cap);
	if (!buf)
		die("malloc failed");
	for (;;) {
		size_t got;

		if (len == cap) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				die("realloc failed");
		}
		got = read_full(p[0], buf + len, cap - len);
		len += got;
		if (len < cap)
			break; /* EOF */
	}
	xclose(p[0]);
	st = xwaitpid(pid);
	if (len == 0 || buf[len - 1] != '\n')
		die("child output does not end with a newline (%zu bytes)", len);
	for (line = buf; line < buf + len; line = nl + 1) {
		char want[160];

		nl = memchr(line, '\n', (size_t)(buf + len - line));
		*nl = '\0';
		lines++;
		if (strncmp(line, "line ", 5) != 0)
			die("unexpected line from child: %s", line);
		snprintf(want, sizeof want, "line %d of 5: ", lines);
		if (strncmp(line, want, strlen(want)) != 0)
			die("line %d out of order: %s", lines, line);
		printf("from child: %s\n", line);
	}
	if (lines != 5)
		die("got %d lines from the child, expected 5", lines);
	expect_exit(st, 0, "child");
	printf("child exited 0\n");
	return 0;
}
