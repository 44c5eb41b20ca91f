/*
 * mh_block — children that block on a pipe, for the multi-host tests.
 *
 * `mh_block [-n N] [-d MS] [-w]` sleeps MS milliseconds (default 0), then
 * forks N children (default 4).  Child i prints `child <i> up` and reads a
 * pipe whose write end only the parent keeps: it blocks until the parent
 * closes that end (EOF: exits 0).  Once all N exist the parent prints
 * `ready n=<N>` (flushed).
 *
 * Without -w the parent then naps forever (1 s at a time: a process with a
 * timer is never idle, so the VMs are not a deadlock; only a kill ends it).
 *
 * With -w the parent watches: it polls waitpid(-1, WNOHANG) with 10 ms naps
 * (again never idle) and prints `child <pid>: exited <code>` or
 * `child <pid>: killed by <SIGNAME>` for each child that ends; after the
 * first one ends it closes the write end, so every child still alive reads
 * EOF and exits 0.  When all are reaped it prints `reaped=<N>` and exits 0.
 * (Natively -w waits forever unless something kills a child.)
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void nap_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* Own copy: tests/guest is not beside guest_common.h, which its image keys do not cover. */
static const char *signame(int sig)
{
	switch (sig) {
	case SIGKILL: return "SIGKILL";
	case SIGTERM: return "SIGTERM";
	case SIGPIPE: return "SIGPIPE";
	case SIGSEGV: return "SIGSEGV";
	default: return "SIG?";
	}
}

int main(int argc, char **argv)
{
	long n = 4, delay = 0, reaped = 0;
	int watch = 0, opt, p[2], st;

	while ((opt = getopt(argc, argv, "n:d:w")) != -1) {
		switch (opt) {
		case 'n': n = atol(optarg); break;
		case 'd': delay = atol(optarg); break;
		case 'w': watch = 1; break;
		default:
			fprintf(stderr, "usage: %s [-n N] [-d MS] [-w]\n", argv[0]);
			return 2;
		}
	}
	if (n < 1 || delay < 0) {
		fprintf(stderr, "mh_block: bad arguments\n");
		return 2;
	}
	if (pipe(p) != 0) {
		perror("mh_block: pipe");
		return 1;
	}
	if (delay)
		nap_ms(delay);
	for (long i = 0; i < n; i++) {
		pid_t pid;

		fflush(stdout);
		pid = fork();
		if (pid < 0) {
			perror("mh_block: fork");
			return 1;
		}
		if (pid == 0) {
			char c;
			ssize_t r;

			close(p[1]);
			printf("child %ld up\n", i);
			fflush(stdout);
			do
				r = read(p[0], &c, 1);
			while (r < 0 && errno == EINTR);
			_exit(r == 0 ? 0 : 5);
		}
	}
	close(p[0]);
	printf("ready n=%ld\n", n);
	fflush(stdout);
	if (!watch)
		for (;;)
			nap_ms(1000);
	while (reaped < n) {
		pid_t r = waitpid(-1, &st, WNOHANG);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			perror("mh_block: waitpid");
			return 1;
		}
		if (r == 0) {
			nap_ms(10);
			continue;
		}
		if (WIFEXITED(st))
			printf("child %d: exited %d\n", (int)r, WEXITSTATUS(st));
		else if (WIFSIGNALED(st))
			printf("child %d: killed by %s\n", (int)r, signame(WTERMSIG(st)));
		else
			printf("child %d: status 0x%x\n", (int)r, st);
		fflush(stdout);
		if (reaped++ == 0)
			close(p[1]);
	}
	printf("reaped=%ld\n", reaped);
	return 0;
}
