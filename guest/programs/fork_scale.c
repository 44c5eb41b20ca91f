/*
 * fork_scale — how long does it take to have N live children?
 *
 * `fork_scale -n N [-h MS]` (default N = 32, MS = 0) forks N children that
 * each write one byte to a "ready" pipe and then block reading a second
 * ("hold") pipe.  The parent times (CLOCK_MONOTONIC) from just before the
 * first fork() to just after the last fork() returned (fork_all_us), and to
 * the moment it has read all N ready bytes, i.e. every child has run and is
 * about to block (ready_all_us).  It then prints `children=<N>` (flushed: a
 * host watching the console sees it while all N children are alive and
 * blocked) and, with -h, sleeps MS milliseconds so that a host can measure
 * memory meanwhile.  Then it closes the hold pipe: each child sees EOF and
 * exits 0; the parent reaps them with wait() until ECHILD and checks it
 * reaped exactly N, all with status 0.  With -n 0 nothing is forked: the
 * baseline of the same program.
 *
 * Output:      fork_all_us=<float>
 *              ready_all_us=<float>
 *              children=<N>
 *              reaped=<N>
 * Exit status 0 only if every fork succeeded and every child exited 0.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	long n = 32, hold_ms = 0, reaped = 0, ready = 0;
	int opt, hold[2], rdy[2], st;
	double t0, t_forked, t_ready;

	while ((opt = getopt(argc, argv, "n:h:")) != -1) {
		switch (opt) {
		case 'n': n = atol(optarg); break;
		case 'h': hold_ms = atol(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-n N] [-h MS]\n", argv[0]);
			return 2;
		}
	}
	if (n < 0 || hold_ms < 0) {
		fprintf(stderr, "fork_scale: bad -n %ld or -h %ld\n", n, hold_ms);
		return 2;
	}
	if (pipe(hold) != 0 || pipe(rdy) != 0) {
		perror("fork_scale: pipe");
		return 1;
	}
	fflush(stdout);
	t0 = now_us();
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0) {
			perror("fork_scale: fork");
			return 1;
		}
		if (pid == 0) {
			char c = 'r';
			ssize_t r;

			close(hold[1]);
			close(rdy[0]);
			if (write(rdy[1], &c, 1) != 1)
				_exit(4);
			close(rdy[1]);
			do
				r = read(hold[0], &c, 1);
			while (r < 0 && errno == EINTR);
			_exit(r == 0 ? 0 : 5);
		}
	}
	t_forked = now_us();
	close(rdy[1]);
	while (ready < n) {
		char buf[256];
		ssize_t r = read(rdy[0], buf, sizeof buf);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fprintf(stderr, "fork_scale: %ld of %ld children ready, then %s\n", ready, n,
				r == 0 ? "EOF" : "an error");
			return 1;
		}
		ready += r;
	}
	t_ready = now_us();
	close(rdy[0]);
	printf("fork_all_us=%.3f\n", t_forked - t0);
	printf("ready_all_us=%.3f\n", t_ready - t0);
	printf("children=%ld\n", n);
	fflush(stdout);
	if (hold_ms > 0) {
		struct timespec ts = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};

		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
	}
	close(hold[1]);
	close(hold[0]);
	for (;;) {
		pid_t r = wait(&st);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				break;
			perror("fork_scale: wait");
			return 1;
		}
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			fprintf(stderr, "fork_scale: child %d ended with status 0x%x\n", (int)r, st);
			return 1;
		}
		reaped++;
	}
	if (reaped != n) {
		fprintf(stderr, "fork_scale: reaped %ld, forked %ld\n", reaped, n);
		return 1;
	}
	printf("reaped=%ld\n", reaped);
	return 0;
}
