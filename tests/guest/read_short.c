/* A pipe read into a buffer that runs off the end of a mapping (the page after
 * the image's bss, which a unifork VM never maps): Linux fails the read with
 * EFAULT and leaves the bytes in the pipe for the next read. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char _end[];

int main(void)
{
	uintptr_t top = ((uintptr_t)_end + 4095) & ~(uintptr_t)4095;
	char *edge = (char *)top - 4;
	char rest[64];
	int fds[2];

	if (pipe(fds))
		return 10;
	pid_t child = fork();
	if (child < 0)
		return 11;
	if (child == 0)
		_exit(write(fds[1], "abcdefgh", 8) == 8 ? 0 : 1);
	close(fds[1]);
	int st;
	if (waitpid(child, &st, 0) != child || st != 0)
		return 12;
	ssize_t r = read(fds[0], edge, 64);
	printf("read at the edge: %zd %s \"%.*s\"\n", r, r < 0 ? strerror(errno) : "",
	       r > 0 ? (int)r : 0, edge);
	r = read(fds[0], rest, sizeof rest);
	printf("then: %zd \"%.*s\"\n", r, r > 0 ? (int)r : 0, rest);
	return 0;
}
