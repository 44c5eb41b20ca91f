/* A pipe read into a buffer that runs off the end of a mapping (the page after
 * the image's bss, which a unifork VM never maps): Linux fails the read with
 * EFAULT and leaves the bytes in the pipe for the next read.  The same for a
 * readv whose second iovec runs off the end after taking part of the bytes. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

extern char _end[];

static void show(const char *what, ssize_t r, const char *buf)
{
	printf("%s: %zd %s \"%.*s\"\n", what, r, r < 0 ? strerror(errno) : "",
	       r > 0 ? (int)r : 0, buf);
}

int main(void)
{
	uintptr_t top = ((uintptr_t)_end + 4095) & ~(uintptr_t)4095;
	char *edge = (char *)top - 4;
	char rest[64];
	int a[2], b[2];

	if (pipe(a) || pipe(b))
		return 10;
	pid_t child = fork();
	if (child < 0)
		return 11;
	if (child == 0)
		_exit(write(a[1], "abcdefgh", 8) == 8 && write(b[1], "0123456789AB", 12) == 12
		      ? 0 : 1);
	close(a[1]);
	close(b[1]);
	int st;
	if (waitpid(child, &st, 0) != child || st != 0)
		return 12;
	ssize_t r = read(a[0], edge, 64);
	show("read at the edge", r, edge);
	r = read(a[0], rest, sizeof rest);
	show("then", r, rest);

	struct iovec iov[2] = {{rest, 4}, {edge, 64}};
	r = readv(b[0], iov, 2);
	show("readv into the edge", r, rest);
	r = read(b[0], rest, sizeof rest);
	show("then", r, rest);
	return 0;
}
