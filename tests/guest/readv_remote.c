/*
 * readv_remote: a readv that fills its first iovec must leave nothing behind.
 *
 * The parent readv()s pipe A with two 10-byte iovecs while A holds exactly
 * 10 bytes, so the first iovec is filled and the second finds A empty.  The
 * child then writes "XXXX" to A and "BBBB" to B.  The parent must read "BBBB"
 * from B and then "XXXX" from A.  In VM-clone mode A and B live in the pipe
 * broker; a readv that sent a second read request for the empty iovec and
 * returned without waiting for its reply left that request behind: the
 * broker later answered it with A's "XXXX", which was then lost, or handed
 * to the parent's next pipe read (of B).  (Found by syscall_fuzz -f.)
 *
 * Output:  readv=10 first=0123456789
 *          b=BBBB a=XXXX
 *          child exited 0
 * the same natively, in a thread-fork VM and with VM-clone fork; exit 0.
 */
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static void must(int ok, const char *what)
{
	if (!ok) {
		printf("readv_remote: %s failed\n", what);
		_exit(1);
	}
}

int main(void)
{
	int a[2], b[2], go[2], st;
	char one[11] = "", two[11] = "", got[8], c;
	struct iovec iov[2] = { { one, 10 }, { two, 10 } };
	ssize_t n;
	pid_t pid;

	must(pipe(a) == 0 && pipe(b) == 0 && pipe(go) == 0, "pipe");
	fflush(stdout);
	pid = fork();
	must(pid >= 0, "fork");
	if (pid == 0) {
		close(a[0]);
		close(b[0]);
		close(go[1]);
		must(write(a[1], "0123456789", 10) == 10, "child write A");
		must(read(go[0], &c, 1) == 1, "child read go");
		must(write(a[1], "XXXX", 4) == 4, "child write A again");
		must(write(b[1], "BBBB", 4) == 4, "child write B");
		_exit(0);
	}
	close(a[1]);
	close(b[1]);
	close(go[0]);
	n = readv(a[0], iov, 2);
	printf("readv=%zd first=%s\n", n, one);
	must(write(go[1], "g", 1) == 1, "write go");
	n = read(b[0], got, sizeof got - 1);
	must(n >= 0, "read B");
	got[n] = 0;
	printf("b=%s", got);
	n = read(a[0], got, sizeof got - 1);
	must(n >= 0, "read A");
	got[n] = 0;
	printf(" a=%s\n", got);
	must(waitpid(pid, &st, 0) == pid, "waitpid");
	printf("child exited %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	return 0;
}
