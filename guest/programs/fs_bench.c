/*
 * fs_bench.c — write then read one file in 64 KiB blocks; report how far it got.
 *
 * usage: fs_bench FILE MIB [figures]
 * stdout: "wrote N bytes" (or "write stopped: ENOSPC after N bytes"), "read N bytes";
 *         with "figures" also write_mib_per_s=X and read_mib_per_s=Y (unifork compare)
 * stderr: write and read MiB/s (timings: for the benchmark, not for tests)
 * A FILE that ends in '/' is a directory: the file is fs_bench.PID in it.
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

	static char name[4096];

	top_pid = getpid();
	if (argc != 3 && argc != 4)
		die("usage: fs_bench FILE MIB [figures]");
	total = atol(argv[2]) << 20;
	memset(buf, 'x', sizeof buf);
	if (argv[1][0] && argv[1][strlen(argv[1]) - 1] == '/')
		snprintf(name, sizeof name, "%sfs_bench.%d", argv[1], (int)getpid());
	else
		snprintf(name, sizeof name, "%s", argv[1]);
	fd = open(name, O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (fd < 0)
		die("open %s: %s", name, strerror(errno));
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
	if (argc == 4) {
		printf("write_mib_per_s=%.3f\n", done / 1048576.0 / (t1 - t0));
		printf("read_mib_per_s=%.3f\n", got / 1048576.0 / (t2 - t1));
	}
	close(fd);
	unlink(name);
	return 0;
}
