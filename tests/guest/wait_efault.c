/* wait4 with a status pointer it cannot write: Linux reaps the child first,
 * then fails the copy with EFAULT (kernel_wait4), so the child is gone.
 * Also: WNOHANG with a bad pointer and nothing to reap returns 0. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define BAD ((int *)0x10)

int main(void)
{
	int fds[2];
	char c;

	if (pipe(fds))
		return 10;
	pid_t child = fork();
	if (child < 0)
		return 11;
	if (child == 0) {
		close(fds[1]);
		(void)read(fds[0], &c, 1); /* wait until the parent has tried WNOHANG */
		_exit(3);
	}
	close(fds[0]);
	long r = syscall(SYS_wait4, child, BAD, WNOHANG, NULL);
	printf("WNOHANG, child running: %ld\n", r);
	close(fds[1]);
	r = syscall(SYS_wait4, child, BAD, 0, NULL);
	printf("bad status pointer: %ld %s\n", r, r < 0 ? strerror(errno) : "");
	r = waitpid(child, NULL, WNOHANG);
	printf("waited again: %ld %s\n", r, r < 0 ? strerror(errno) : "");
	return 0;
}
