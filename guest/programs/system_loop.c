/*
 * system_loop — how long does system("...") take?  (A workload of `unifork compare`.)
 *
 *   system_loop -n N            N times system("exit K"), K = iteration % 100
 *   system_loop -n N -s SHELL   the same with SHELL as the shell: what musl's
 *                               system() does (posix_spawn of SHELL with
 *                               "sh -c CMD", SIGINT/SIGQUIT ignored and SIGCHLD
 *                               blocked meanwhile, then waitpid), for a host
 *                               whose /bin/sh is not the shell to measure
 *                               (natively, where /bin/sh is the host's)
 *
 * Each iteration is timed from just before the call to its return in the
 * caller (CLOCK_MONOTONIC) and printed as `system_us=<microseconds>`; its
 * status must be exit K, so the shell really ran each command.  Then one
 * summary line `system_summary runs=N mean_us=... ok=1`.  Exit status 0 only
 * if every command ran and exited as expected.  stdout is flushed before each
 * call so that no line is printed twice.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROG "system_loop"

#include "guest_common.h"

extern char **environ;

static double monotonic_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

/* system(cmd) with `shell` in place of /bin/sh, as musl's system() is written:
 * the wait status, or -1 */
static int system_with(const char *shell, const char *cmd)
{
	struct sigaction sa = {.sa_handler = SIG_IGN}, oldint, oldquit;
	sigset_t old, reset;
	posix_spawnattr_t attr;
	char *argv[] = {"sh", "-c", (char *)cmd, NULL};
	pid_t pid;
	int status = -1, err;

	sigaction(SIGINT, &sa, &oldint);
	sigaction(SIGQUIT, &sa, &oldquit);
	sigaddset(&sa.sa_mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &sa.sa_mask, &old);
	sigemptyset(&reset);
	if (oldint.sa_handler != SIG_IGN)
		sigaddset(&reset, SIGINT);
	if (oldquit.sa_handler != SIG_IGN)
		sigaddset(&reset, SIGQUIT);
	posix_spawnattr_init(&attr);
	posix_spawnattr_setsigmask(&attr, &old);
	posix_spawnattr_setsigdefault(&attr, &reset);
	posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
	err = posix_spawn(&pid, shell, NULL, &attr, argv, environ);
	posix_spawnattr_destroy(&attr);
	if (!err)
		while (waitpid(pid, &status, 0) < 0 && get_errno() == EINTR)
			;
	sigaction(SIGINT, &oldint, NULL);
	sigaction(SIGQUIT, &oldquit, NULL);
	sigprocmask(SIG_SETMASK, &old, NULL);
	if (err) {
		set_errno(err);
		return -1;
	}
	return status;
}

int main(int argc, char **argv)
{
	const char *shell = NULL;
	double total = 0;
	long runs = -1;
	int opt, ok = 1;

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "n:s:")) != -1) {
		if (opt == 'n')
			runs = atol(optarg);
		else if (opt == 's')
			shell = optarg;
		else
			runs = -1, optind = argc;
	}
	if (runs < 0 || optind != argc)
		die("usage: system_loop -n N [-s SHELL]");
	for (long i = 0; i < runs; i++) {
		char cmd[32];
		int expected = (int)(i % 100);

		snprintf(cmd, sizeof cmd, "exit %d", expected);
		fflush(stdout);
		double t1 = monotonic_us();
		int status = shell ? system_with(shell, cmd) : system(cmd);
		double us = monotonic_us() - t1;
		if (status == -1)
			DIE_ERRNO("system");
		if (!WIFEXITED(status) || WEXITSTATUS(status) != expected) {
			fprintf(stderr, PROG ": '%s' ended with status 0x%x\n", cmd, status);
			ok = 0;
		}
		printf("system_us=%.3f\n", us);
		total += us;
	}
	printf("system_summary runs=%ld mean_us=%.3f ok=%d\n", runs,
	       runs ? total / (double)runs : 0.0, ok);
	return ok ? 0 : 1;
}
