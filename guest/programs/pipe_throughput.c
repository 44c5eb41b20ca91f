/*
 * pipe_throughput — bulk data from a child to its parent through a pipe.
 *
 * Checks: the child writes -m MiB (default 64) in 64 KiB write()s; byte i of
 * the stream is pattern(i) (a cheap hash of the offset, see below); the
 * parent reads until EOF, checks every byte against the pattern, the total
 * length, and the child's exit status 0, and computes FNV-1a (64-bit) over
 * the stream.
 *
 * Output:      bytes=<n> checksum=<16 hex digits>
 * With -t:     mib_per_s=<float>   (second line; fork to reaped child)
 * Thread-fork VM: identical output (except the -t figure).
 *
 * Reference values: -m 1 -> checksum=77f5308cd8e03d4c,
 *                   -m 64 -> checksum=e49d43a8b87a8265.
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
#include <time.h>

#define PROG "pipe_throughput"
#define CHUNK 65536

#include "guest_common.h"

/* Separate buffers for the writer and the reader: in the thread-fork VM
 * globals are shared between parent and child. */
static unsigned char child_buf[CHUNK];
static unsigned char parent_buf[CHUNK];

static inline unsigned char pattern(uint64_t off)
{
	uint32_t x = (uint32_t)off;

	x ^= x >> 7;
	x *= 0x9E3779B1u;
	return (unsigned char)(x >> 24);
}

static double now_s(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		DIE_ERRNO("clock_gettime");
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	long mib = 64;
	int timing = 0, opt, p[2], st;
	uint64_t total, got = 0, h = 0xcbf29ce484222325ull;
	double t0, t1;
	pid_t pid;

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "m:t")) != -1) {
		switch (opt) {
		case 'm': mib = atol(optarg); break;
		case 't': timing = 1; break;
		default:
			fprintf(stderr, "usage: %s [-m MiB] [-t]\n", argv[0]);
			return 2;
		}
	}
	if (mib < 0)
		die("bad -m %ld", mib);
	total = (uint64_t)mib << 20;

	xpipe(p);
	t0 = now_s();
	pid = xfork();
	if (pid == 0) {
		uint64_t off = 0;

		close(p[0]);
		while (off < total) {
			size_t n = total - off < CHUNK ? (size_t)(total - off) : CHUNK;
			for (size_t j = 0; j < n; j++)
				child_buf[j] = pattern(off + j);
			write_full(p[1], child_buf, n);
			off += n;
		}
		close(p[1]);
		_exit(0);
	}
	xclose(p[1]);
	for (;;) {
		ssize_t r = read(p[0], parent_buf, CHUNK);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			DIE_ERRNO("read");
		}
		if (r == 0)
			break;
		for (ssize_t j = 0; j < r; j++) {
			unsigned char b = parent_buf[j];
			if (b != pattern(got + (uint64_t)j))
				die("data mismatch at offset %llu: got 0x%02x, expected 0x%02x",
				    (unsigned long long)(got + (uint64_t)j), b,
				    pattern(got + (uint64_t)j));
			h ^= b;
			h *= 0x100000001b3ull;
		}
		got += (uint64_t)r;
		if (got > total)
			die("received more than %llu bytes", (unsigned long long)total);
	}
	xclose(p[0]);
	st = xwaitpid(pid);
	t1 = now_s();
	expect_exit(st, 0, "writer child");
	if (got != total)
		die("received %llu bytes, expected %llu", (unsigned long long)got,
		    (unsigned long long)total);
	printf("bytes=%llu checksum=%016llx\n", (unsigned long long)got, (unsigned long long)h);
	if (timing)
		printf("mib_per_s=%.3f\n", t1 > t0 ? (double)got / 1048576.0 / (t1 - t0) : 0.0);
	return 0;
}
