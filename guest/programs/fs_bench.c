/*
 * fs_bench.c — write then read one file in 64 KiB blocks; report how far it got.
 *
 * usage: fs_bench FILE MIB
 * stdout: "wrote N bytes" (or "write stopped: ENOSPC after N bytes"), "read N bytes"
 * stderr: write and read MiB/s (timings: for the benchmark, not for tests)
 */
#define PROG "fs_bench"
#include "guest_common.h"

#include <fcntl.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	static char buf[65536];
	long total, done = 0, got = 0;
	int fd;
	double t0, t1, t2;

	top_pid = getpid();
	if (argc != 3)
		die("usage: fs_bench FILE MIB");
	total = atol(argv[2]) << 20;
	memset(buf, 'x', sizeof buf);
	fd = open(argv[1], O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (fd < 0)
		die("open %s: %s", argv[1], strerror(errno));
	t0 = now();
	while (done < total) {
		ssize_t n = write(fd, buf, sizeof buf);
		if (n < 0) {
			printf("write stopped: %s after %ld bytes\n", errno == ENOSPC ? "ENOSPC" : "error", done);
			break;
		}
		done += n;
	}
	if (done >= total)
		printf("wrote %ld bytes\n", done);
	t1 = now();
	lseek(fd, 0, SEEK_SET);
	for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;)
		got += n;
	t2 = now();
	printf("read %ld bytes\n", got);
	fprintf(stderr, "write %.1f MiB/s read %.1f MiB/s\n", done / 1048576.0 / (t1 - t0),
		got / 1048576.0 / (t2 - t1));
	close(fd);
	unlink(argv[1]);
	return 0;
}
