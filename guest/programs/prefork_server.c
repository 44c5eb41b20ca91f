/*
 * prefork_server — a master and W prefork()ed workers sharing a job pipe.
 *
 * Checks: the master forks W workers (-w, default 4).  Jobs (J of them, -j,
 * default 200: "compute 1 + 2 + ... + k") go out as fixed 16-byte records on
 * ONE job pipe that all workers read (writes <= PIPE_BUF are atomic, and
 * every read asks for exactly one record, so records are never split or
 * interleaved); answers come back as 16-byte records on one answer pipe.  The
 * master keeps at most 32 jobs in flight (so neither pipe can fill up and
 * deadlock, whatever the pipe capacity), checks that every job is answered
 * exactly once and correctly, then sends one stop record per worker and reaps
 * all workers with status 0.  Which worker does which job is not printed.
 *
 * Output:      jobs=<J> ok
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
#include <limits.h>

#define PROG "prefork_server"
#define WINDOW 32

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

struct rec {
	uint32_t kind; /* JOB, STOP or ANSWER */
	uint32_t id;   /* job id; for an answer: id of the job */
	uint64_t val;  /* job: k; answer: the sum */
};
enum { JOB = 1, STOP = 2, ANSWER = 3 };

_Static_assert(sizeof(struct rec) == 16, "record size");
_Static_assert(sizeof(struct rec) <= PIPE_BUF, "records must be written atomically");

static uint64_t job_k(uint32_t id)
{
	return 1 + (uint64_t)id * 37 % 1000;
}

static void worker(int jobs_rd, int ans_wr)
{
	struct rec r;

	for (;;) {
		ssize_t n = read(jobs_rd, &r, sizeof r);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			DIE_ERRNO("worker: read");
		if (n != (ssize_t)sizeof r)
			die("worker: read %zd bytes, expected one %zu-byte record", n, sizeof r);
		if (r.kind == STOP)
			_exit(0);
		if (r.kind != JOB)
			die("worker: bad record kind %u", r.kind);
		{
			uint64_t sum = 0;
			struct rec a;

			for (uint64_t i = 1; i <= r.val; i++)
				sum += i;
			a.kind = ANSWER;
			a.id = r.id;
			a.val = sum;
			write_full(ans_wr, &a, sizeof a);
		}
	}
}

int main(int argc, char **argv)
{
	int w = 4, jobs = 200, opt, jp[2], ap[2], i;
	int sent = 0, answered = 0;
	unsigned char *done;
	pid_t *pids;
	char who[64];

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "w:j:")) != -1) {
		switch (opt) {
		case 'w': w = atoi(optarg); break;
		case 'j': jobs = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-w workers] [-j jobs]\n", argv[0]);
			return 2;
		}
	}
	if (w < 1 || jobs < 0)
		die("bad arguments");
	done = calloc((size_t)jobs + 1, 1);
	pids = malloc(sizeof *pids * (size_t)w);
	if (!done || !pids)
		die("malloc failed");
	xpipe(jp);
	xpipe(ap);
	for (i = 0; i < w; i++) {
		pid_t pid = xfork();
		if (pid == 0) {
			xclose(jp[1]);
			xclose(ap[0]);
			worker(jp[0], ap[1]);
		}
		pids[i] = pid;
	}
	xclose(jp[0]);
	xclose(ap[1]);

	while (answered < jobs) {
		struct rec r;

		while (sent < jobs && sent - answered < WINDOW) {
			r.kind = JOB;
			r.id = (uint32_t)sent;
			r.val = job_k((uint32_t)sent);
			write_full(jp[1], &r, sizeof r);
			sent++;
		}
		read_exact(ap[0], &r, sizeof r, "answer");
		if (r.kind != ANSWER || r.id >= (uint32_t)sent)
			die("bad answer record (kind %u, id %u)", r.kind, r.id);
		if (done[r.id])
			die("job %u answered twice", r.id);
		done[r.id] = 1;
		if (r.val != job_k(r.id) * (job_k(r.id) + 1) / 2)
			die("job %u: wrong answer %llu", r.id, (unsigned long long)r.val);
		answered++;
	}
	for (i = 0; i < w; i++) {
		struct rec r = { STOP, 0, 0 };
		write_full(jp[1], &r, sizeof r);
	}
	xclose(jp[1]);
	for (i = 0; i < w; i++) {
		snprintf(who, sizeof who, "worker %d", i);
		expect_exit(xwaitpid(pids[i]), 0, who);
	}
	{
		char extra;
		if (read_full(ap[0], &extra, 1) != 0)
			die("unexpected data on the answer pipe");
	}
	xclose(ap[0]);
	printf("jobs=%d ok\n", jobs);
	return 0;
}
