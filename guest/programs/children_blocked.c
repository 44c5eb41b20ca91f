/*
 * children_blocked — N live children at once, for memory accounting.
 *
 * `children_blocked [-n N]` (default 32) forks N children that each block
 * reading one pipe; once all N exist the parent prints `children=<N>` (and
 * flushes it, so a host watching the console sees the line while every child
 * is alive and blocked), then closes the pipe's write end: each child sees
 * EOF and exits 0.  The parent reaps them with wait() until ECHILD and checks
 * it reaped exactly N, all with status 0.  With -n 0 nothing is forked: the
 * baseline of the same program.
 *
 * Output:      children=<N>
 *              reaped=<N>
 * Exit status 0 only if every fork succeeded and every child exited 0.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = 32, reaped = 0;
	int opt, p[2], st;

	while ((opt = getopt(argc, argv, "n:")) != -1) {
		switch (opt) {
		case 'n': n = atol(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-n N]\n", argv[0]);
			return 2;
		}
	}
	if (n < 0) {
		fprintf(stderr, "children_blocked: bad -n %ld\n", n);
		return 2;
	}
	if (pipe(p) != 0) {
		perror("children_blocked: pipe");
		return 1;
	}
	fflush(stdout);
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0) {
			perror("children_blocked: fork");
			return 1;
		}
		if (pid == 0) {
			char c;
			ssize_t r;

			close(p[1]);
			do
				r = read(p[0], &c, 1);
			while (r < 0 && errno == EINTR);
			_exit(r == 0 ? 0 : 5);
		}
	}
	printf("children=%ld\n", n);
	fflush(stdout);
	close(p[1]);
	close(p[0]);
	for (;;) {
		pid_t r = wait(&st);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				break;
			perror("children_blocked: wait");
			return 1;
		}
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			fprintf(stderr, "children_blocked: child %d ended with status 0x%x\n",
				(int)r, st);
			return 1;
		}
		reaped++;
	}
	if (reaped != n) {
		fprintf(stderr, "children_blocked: reaped %ld, forked %ld\n", reaped, n);
		return 1;
	}
	printf("reaped=%ld\n", reaped);
	return 0;
}
