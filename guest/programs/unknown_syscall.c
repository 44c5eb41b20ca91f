/* A syscall number no kernel implements must fail with ENOSYS, not kill the process. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
	errno = 0;
	long r = syscall(500, 1, 2, 3);
	int e = errno;
	printf("syscall(500) = %ld %s\n", r, e == ENOSYS ? "ENOSYS" : strerror(e));
	return r == -1 && e == ENOSYS ? 0 : 1;
}
