/*
 * sleep — suspend for a number of seconds (POSIX sleep; fractions as GNU's).
 *
 * A small tool of ours, baked beside dash for the shell tests (background jobs
 * for traps and job control).  A signal with its default action ends it, as
 * the shell's `kill %1` expects.  Exit status 1 on a bad operand.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: sleep SECONDS\n");
		return 1;
	}
	char *end;
	double s = strtod(argv[1], &end);
	if (end == argv[1] || *end || s < 0) {
		fprintf(stderr, "sleep: invalid time interval '%s'\n", argv[1]);
		return 1;
	}
	struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) != 0)
		if (errno != EINTR)
			return 1;
	return 0;
}
