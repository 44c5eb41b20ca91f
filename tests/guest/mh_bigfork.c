/*
 * mh_bigfork — forks of a big process, for the "peer killed during a clone" test.
 *
 * `mh_bigfork [-m MIB] [-n N]` fills MIB MiB (default 32, in 1 MiB blocks)
 * of heap with a pattern, then forks N children (default 40) one after the other: each child
 * checks a word of every page of the pattern and exits 0 (7 if one is wrong);
 * the parent reaps it.  A VM-clone fork therefore moves a snapshot of over
 * MIB MiB each time.  A fork that fails is counted, not fatal.  Output:
 * `fork <i>: <status>` for each failure or bad child, then
 * `ok=<k> failed=<f>`; exit 0 unless a child saw a wrong pattern.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096

int main(int argc, char **argv)
{
	long mib = 32, n = 40, ok = 0, failed = 0, bad = 0;
	unsigned long **blocks;
	size_t per = (1 << 20) / sizeof(unsigned long), step = PAGE / sizeof(unsigned long);
	int opt;

	while ((opt = getopt(argc, argv, "m:n:")) != -1) {
		switch (opt) {
		case 'm': mib = atol(optarg); break;
		case 'n': n = atol(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-m MIB] [-n N]\n", argv[0]);
			return 2;
		}
	}
	if (mib < 1 || n < 1) {
		fprintf(stderr, "mh_bigfork: bad arguments\n");
		return 2;
	}
	blocks = calloc((size_t)mib, sizeof *blocks);
	for (long b = 0; blocks && b < mib; b++) {
		blocks[b] = malloc(per * sizeof(unsigned long));
		if (!blocks[b])
			break;
		for (size_t i = 0; i < per; i += step)
			blocks[b][i] = (b * per + i) * 2654435761UL;
	}
	if (!blocks || !blocks[mib - 1]) {
		perror("mh_bigfork: malloc");
		return 1;
	}
	for (long i = 0; i < n; i++) {
		pid_t pid;
		int st;

		fflush(stdout);
		pid = fork();
		if (pid < 0) {
			printf("fork %ld: %s\n", i, strerror(errno));
			failed++;
			continue;
		}
		if (pid == 0) {
			for (long b = 0; b < mib; b++)
				for (size_t j = 0; j < per; j += step)
					if (blocks[b][j] != (b * per + j) * 2654435761UL)
						_exit(7);
			_exit(0);
		}
		if (waitpid(pid, &st, 0) != pid) {
			perror("mh_bigfork: waitpid");
			return 1;
		}
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
			ok++;
			continue;
		}
		printf("fork %ld: child status 0x%x\n", i, st);
		if (WIFEXITED(st) && WEXITSTATUS(st) == 7)
			bad++;
		else
			failed++;
	}
	printf("ok=%ld failed=%ld\n", ok, failed);
	return bad ? 1 : 0;
}
