/*
 * pipe_bw — pipe bandwidth with cheap checks (the pipe, not the CPU).
 *
 * The child writes -m MiB (default 64) to its parent through a pipe in
 * 64 KiB write()s.  Its buffer is filled once; only the first 8 bytes of each
 * 64 KiB block (the block's sequence number) and the last 8 bytes (its
 * bitwise complement) change from block to block.  The parent reads whole
 * blocks (re-reading after short reads), checks both words of every block,
 * the total byte count and the child's exit status 0.  Unlike
 * pipe_throughput, which checks and hashes every byte (CPU-bound in an
 * emulator), this measures the cost of moving the data.
 *
 * The parent times from just after its first read() returns to EOF
 * (CLOCK_MONOTONIC) and counts the bytes received in that interval.
 *
 * Output:      bytes=<n> blocks=<k>
 *              mib_per_s=<float>
 * Exit status 0 only if every check passed.
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

#define CHUNK 65536

/* Separate buffers for writer and reader: in the thread-fork VM globals are
 * shared between parent and child. */
static unsigned char child_buf[CHUNK];
static unsigned char parent_buf[CHUNK];

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static __attribute__((noreturn)) void child(int fd, uint64_t total)
{
	uint64_t seq = 0, off = 0;

	for (size_t i = 0; i < CHUNK; i++)
		child_buf[i] = (unsigned char)(i * 131u + 7u);
	while (off < total) {
		size_t n = total - off < CHUNK ? (size_t)(total - off) : CHUNK;
		uint64_t inv = ~seq;
		size_t done = 0;

		memcpy(child_buf, &seq, 8);
		memcpy(child_buf + CHUNK - 8, &inv, 8);
		while (done < n) {
			ssize_t w = write(fd, child_buf + done, n - done);
			if (w < 0) {
				if (errno == EINTR)
					continue;
				_exit(3);
			}
			done += (size_t)w;
		}
		off += n;
		seq++;
	}
	close(fd);
	_exit(0);
}

int main(int argc, char **argv)
{
	long mib = 64;
	int opt, p[2], st;
	uint64_t total, got = 0, first = 0, blocks = 0;
	double t0 = 0, t1;
	pid_t pid;

	while ((opt = getopt(argc, argv, "m:")) != -1) {
		switch (opt) {
		case 'm': mib = atol(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-m MiB]\n", argv[0]);
			return 2;
		}
	}
	if (mib <= 0) {
		fprintf(stderr, "pipe_bw: bad -m %ld\n", mib);
		return 2;
	}
	total = (uint64_t)mib << 20;
	if (pipe(p) != 0) {
		perror("pipe_bw: pipe");
		return 1;
	}
	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		perror("pipe_bw: fork");
		return 1;
	}
	if (pid == 0) {
		close(p[0]);
		child(p[1], total);
	}
	close(p[1]);
	for (;;) {
		size_t have = 0;

		/* one whole block (or the tail before EOF) */
		while (have < CHUNK) {
			ssize_t r = read(p[0], parent_buf + have, CHUNK - have);
			if (r < 0) {
				if (errno == EINTR)
					continue;
				perror("pipe_bw: read");
				return 1;
			}
			if (r == 0)
				break;
			if (got == 0 && have == 0) {
				t0 = now_s();
				first = (uint64_t)r;
			}
			have += (size_t)r;
		}
		if (have == 0)
			break;
		if (have != CHUNK) {
			fprintf(stderr, "pipe_bw: short block %llu: %zu bytes\n",
				(unsigned long long)blocks, have);
			return 1;
		}
		uint64_t seq, inv;
		memcpy(&seq, parent_buf, 8);
		memcpy(&inv, parent_buf + CHUNK - 8, 8);
		if (seq != blocks || inv != ~blocks) {
			fprintf(stderr, "pipe_bw: block %llu has sequence %llu / %llx\n",
				(unsigned long long)blocks, (unsigned long long)seq,
				(unsigned long long)inv);
			return 1;
		}
		got += have;
		blocks++;
		if (got > total) {
			fprintf(stderr, "pipe_bw: more than %llu bytes\n", (unsigned long long)total);
			return 1;
		}
	}
	t1 = now_s();
	close(p[0]);
	if (waitpid(pid, &st, 0) != pid) {
		perror("pipe_bw: waitpid");
		return 1;
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		fprintf(stderr, "pipe_bw: writer ended with status 0x%x\n", st);
		return 1;
	}
	if (got != total) {
		fprintf(stderr, "pipe_bw: received %llu bytes, expected %llu\n",
			(unsigned long long)got, (unsigned long long)total);
		return 1;
	}
	printf("bytes=%llu blocks=%llu\n", (unsigned long long)got, (unsigned long long)blocks);
	printf("mib_per_s=%.3f\n",
	       t1 > t0 ? (double)(got - first) / 1048576.0 / (t1 - t0) : 0.0);
	return 0;
}
