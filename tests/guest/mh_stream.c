/*
 * mh_stream — a paced stream through a pipe, for the multi-host link tests.
 *
 * `mh_stream [-m MIB] [-r MIB_PER_S]` forks one child that writes MIB MiB
 * (default 16) to its parent through a pipe, in 64 KiB blocks, at about
 * MIB_PER_S MiB/s (default 4: it naps between blocks), so the transfer lasts
 * long enough for a test to cut the network under it.  Every block carries
 * its sequence number in its first and last 8 bytes.  The parent reads whole
 * blocks, checks every sequence number, prints `mib=<k>` (flushed) each time
 * k MiB have arrived, then `ok blocks=<n>` when EOF comes after exactly MIB
 * MiB and the child exited 0; anything else is reported and exits 1.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (64 * 1024)
#define PER_MIB ((1024 * 1024) / BLOCK)

static unsigned char buf[BLOCK];

static void nap_ns(long ns)
{
	struct timespec ts = {ns / 1000000000L, ns % 1000000000L};

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Whole block or 0 at EOF; -1 on error or a block cut short by EOF. */
static int read_block(int fd, unsigned char *p)
{
	size_t got = 0;

	while (got < BLOCK) {
		ssize_t r = read(fd, p + got, BLOCK - got);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		if (r == 0)
			return got ? -1 : 0;
		got += (size_t)r;
	}
	return 1;
}

int main(int argc, char **argv)
{
	long mib = 16, rate = 4, blocks, seen = 0;
	int opt, p[2], st, r;
	pid_t pid;

	while ((opt = getopt(argc, argv, "m:r:")) != -1) {
		switch (opt) {
		case 'm': mib = atol(optarg); break;
		case 'r': rate = atol(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-m MIB] [-r MIB_PER_S]\n", argv[0]);
			return 2;
		}
	}
	if (mib < 1 || rate < 1) {
		fprintf(stderr, "mh_stream: bad arguments\n");
		return 2;
	}
	blocks = mib * PER_MIB;
	if (pipe(p) != 0) {
		perror("mh_stream: pipe");
		return 1;
	}
	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		perror("mh_stream: fork");
		return 1;
	}
	if (pid == 0) {
		long pause = 1000000000L / (rate * PER_MIB);

		close(p[0]);
		for (uint64_t i = 0; i < (uint64_t)blocks; i++) {
			memcpy(buf, &i, sizeof i);
			memcpy(buf + BLOCK - sizeof i, &i, sizeof i);
			if (write_all(p[1], buf, BLOCK) != 0)
				_exit(3);
			nap_ns(pause);
		}
		_exit(0);
	}
	close(p[1]);
	while ((r = read_block(p[0], buf)) == 1) {
		uint64_t a, b;

		memcpy(&a, buf, sizeof a);
		memcpy(&b, buf + BLOCK - sizeof b, sizeof b);
		if (a != (uint64_t)seen || b != (uint64_t)seen) {
			printf("block %ld: sequence %llu/%llu\n", seen, (unsigned long long)a,
			       (unsigned long long)b);
			return 1;
		}
		if (++seen % PER_MIB == 0) {
			printf("mib=%ld\n", seen / PER_MIB);
			fflush(stdout);
		}
	}
	if (waitpid(pid, &st, 0) != pid) {
		perror("mh_stream: waitpid");
		return 1;
	}
	if (r < 0 || seen != blocks || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		printf("bad end: read %d, %ld of %ld blocks, child status 0x%x\n", r, seen, blocks,
		       st);
		return 1;
	}
	printf("ok blocks=%ld\n", seen);
	return 0;
}
