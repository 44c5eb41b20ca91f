/* One write(2) of N MiB (default 3) of a known pattern to stdout: larger than a
 * console frame, so the VM process must split it and the tender rejoin it. */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t n = (size_t)(argc > 1 ? atoi(argv[1]) : 3) << 20;
	unsigned char *buf = malloc(n);
	size_t done = 0;

	if (!buf)
		return 1;
	for (size_t i = 0; i < n; i++)
		buf[i] = (unsigned char)(i * 7 + i / 251);
	while (done < n) {
		ssize_t w = write(1, buf + done, n - done);
		if (w <= 0)
			return 2;
		done += (size_t)w;
	}
	return 0;
}
