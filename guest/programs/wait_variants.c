/*
 * wait_variants — the wait family and the wait status encodings.
 *
 * Checks:
 *   - waitpid(pid, WNOHANG) returns 0 while the child is alive (blocked
 *     reading a pipe); after the parent releases it a blocking waitpid()
 *     reaps it with status 0;
 *   - wait() reaps any child: three children exiting 11, 12, 13 are all
 *     reaped with the right status for the right pid;
 *   - waitpid() for a specific pid reaps exactly that child (two children,
 *     reaped in the opposite order of their creation);
 *   - with no children left, waitpid(-1), waitpid(-1, WNOHANG) and wait()
 *     fail with ECHILD;
 *   - wait4() with an rusage pointer returns the status and fills rusage;
 *   - status encodings: exit(3) -> WIFEXITED, WEXITSTATUS 3;
 *     raise(SIGTERM), abort(), kill(getpid(), SIGKILL) and a NULL-pointer
 *     store -> WIFSIGNALED with SIGTERM, SIGABRT, SIGKILL, SIGSEGV.
 *
 * Output:      WNOHANG: 0 while child alive
 *              waitpid: reaped released child, status 0
 *              wait: reaped 3 children, statuses 11 12 13
 *              waitpid: reaped 2 children in chosen order
 *              ECHILD: waitpid(-1), waitpid(-1, WNOHANG) and wait() with no children
 *              wait4: status 5, rusage filled
 *              exit(3): WIFEXITED status=3
 *              raise(SIGTERM): WIFSIGNALED sig=SIGTERM
 *              abort(): WIFSIGNALED sig=SIGABRT
 *              kill(getpid(), SIGKILL): WIFSIGNALED sig=SIGKILL
 *              NULL store: WIFSIGNALED sig=SIGSEGV
 * Thread-fork VM: identical output.
 * (Run natively with RLIMIT_CORE 0, or abort/SIGSEGV may write core files.)
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
#include <sys/resource.h>

#define PROG "wait_variants"

#include "guest_common.h"

static void do_exit3(void) { exit(3); }
static void do_raise(void) { raise(SIGTERM); }
static void do_abort(void) { abort(); }
static void do_kill(void) { kill(getpid(), SIGKILL); }
static void do_null(void)
{
	volatile int *volatile np = NULL;

	*np = 1;
}

struct enc_case {
	const char *name;
	void (*fn)(void);
	int sig; /* 0: exit status 3 */
};

static const struct enc_case enc_cases[] = {
	{ "exit(3)", do_exit3, 0 },
	{ "raise(SIGTERM)", do_raise, SIGTERM },
	{ "abort()", do_abort, SIGABRT },
	{ "kill(getpid(), SIGKILL)", do_kill, SIGKILL },
	{ "NULL store", do_null, SIGSEGV },
};

int main(void)
{
	int p[2], st, i;
	pid_t pid, r;
	char c;

	top_pid = getpid();

	/* WNOHANG while the child is alive */
	xpipe(p);
	pid = xfork();
	if (pid == 0) {
		close(p[1]);
		if (read_full(p[0], &c, 1) != 1)
			_exit(9);
		_exit(0);
	}
	xclose(p[0]);
	r = waitpid(pid, &st, WNOHANG);
	if (r != 0)
		die("waitpid(WNOHANG) on a live child returned %d", (int)r);
	r = waitpid(-1, &st, WNOHANG);
	if (r != 0)
		die("waitpid(-1, WNOHANG) with a live child returned %d", (int)r);
	printf("WNOHANG: 0 while child alive\n");
	write_full(p[1], "go", 1);
	xclose(p[1]);
	expect_exit(xwaitpid(pid), 0, "released child");
	printf("waitpid: reaped released child, status 0\n");

	/* wait() for any child */
	{
		pid_t kids[3];
		int seen[3] = { 0, 0, 0 };

		for (i = 0; i < 3; i++) {
			kids[i] = xfork();
			if (kids[i] == 0)
				_exit(11 + i);
		}
		for (i = 0; i < 3; i++) {
			int k;

			do
				r = wait(&st);
			while (r < 0 && errno == EINTR);
			if (r < 0)
				DIE_ERRNO("wait");
			for (k = 0; k < 3 && kids[k] != r; k++)
				;
			if (k == 3)
				die("wait() returned unknown pid %d", (int)r);
			if (seen[k]++)
				die("wait() returned pid %d twice", (int)r);
			expect_exit(st, 11 + k, "wait() child");
		}
		printf("wait: reaped 3 children, statuses 11 12 13\n");
	}

	/* waitpid() for a specific pid */
	{
		pid_t a, b;

		a = xfork();
		if (a == 0)
			_exit(21);
		b = xfork();
		if (b == 0)
			_exit(22);
		expect_exit(xwaitpid(b), 22, "second child");
		expect_exit(xwaitpid(a), 21, "first child");
		printf("waitpid: reaped 2 children in chosen order\n");
	}

	/* ECHILD */
	if (waitpid(-1, &st, 0) != -1 || errno != ECHILD)
		die("waitpid(-1) without children did not fail with ECHILD");
	if (waitpid(-1, &st, WNOHANG) != -1 || errno != ECHILD)
		die("waitpid(-1, WNOHANG) without children did not fail with ECHILD");
	if (wait(&st) != -1 || errno != ECHILD)
		die("wait() without children did not fail with ECHILD");
	printf("ECHILD: waitpid(-1), waitpid(-1, WNOHANG) and wait() with no children\n");

	/* wait4 with rusage */
	{
		struct rusage ru;

		memset(&ru, 0xff, sizeof ru);
		pid = xfork();
		if (pid == 0)
			_exit(5);
		do
			r = wait4(pid, &st, 0, &ru);
		while (r < 0 && errno == EINTR);
		if (r != pid)
			die("wait4 returned %d: %s", (int)r, strerror(errno));
		expect_exit(st, 5, "wait4 child");
		if (ru.ru_utime.tv_sec < 0 || ru.ru_utime.tv_usec < 0 ||
		    ru.ru_utime.tv_usec >= 1000000 || ru.ru_stime.tv_sec < 0 ||
		    ru.ru_stime.tv_usec < 0 || ru.ru_stime.tv_usec >= 1000000)
			die("wait4 did not fill rusage");
		printf("wait4: status 5, rusage filled\n");
	}

	/* status encodings */
	for (i = 0; i < (int)(sizeof enc_cases / sizeof enc_cases[0]); i++) {
		const struct enc_case *ec = &enc_cases[i];

		pid = xfork();
		if (pid == 0) {
			ec->fn();
			_exit(99); /* not reached */
		}
		st = xwaitpid(pid);
		if (ec->sig == 0) {
			expect_exit(st, 3, ec->name);
			printf("%s: WIFEXITED status=%d\n", ec->name, WEXITSTATUS(st));
		} else {
			expect_signal(st, ec->sig, ec->name);
			printf("%s: WIFSIGNALED sig=%s\n", ec->name, signame(WTERMSIG(st)));
		}
	}
	return 0;
}
