/*
 * Bad user pointers must fail with EFAULT, not crash: write(1, (void *)1, 10)
 * and read(0, (void *)8, 10), issued with syscall() so libc cannot interfere.
 * stdin is first replaced by a pipe holding 10 bytes, so the read has data to
 * copy (on an empty stdin Linux would report EOF or block instead).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PROG "efault"

#include "guest_common.h"

static void report(const char *what, long r)
{
	int e = r < 0 ? errno : 0;
	printf("%s = %ld %s\n", what, r, errname(e));
}

int main(void)
{
	int fd[2];

	long r = syscall(SYS_write, 1, (void *)1, 10);
	report("write(1, (void *)1, 10)", r);

	if (pipe(fd) < 0 || write(fd[1], "0123456789", 10) != 10 || dup2(fd[0], 0) < 0) {
		perror("efault: pipe setup");
		return 2;
	}
	r = syscall(SYS_read, 0, (void *)8, 10);
	report("read(0, (void *)8, 10)", r);

	/* the 10 bytes must still be there, untouched by the failed read */
	char buf[11] = {0};
	r = read(0, buf, 10);
	printf("read(0, buf, 10) = %ld \"%s\"\n", r, r > 0 ? buf : "");
	return 0;
}
