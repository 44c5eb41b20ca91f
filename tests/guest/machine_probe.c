/*
 * machine_probe — small probes of the in-memory unikernel, one per mode
 * (tests/test_machine.py and test_cli.py run them; each mode prints a fixed report):
 *
 *   order            printf("a\n"), a raw write of "stderr 1\n" to fd 2,
 *                    printf("b\n"), a raw write of "stderr 2\n", printf("c\n"):
 *                    stdio's buffering decides the order.  On a terminal
 *                    stdout is line buffered: a, stderr 1, b, stderr 2, c.
 *                    Otherwise musl flushes the first line anyway (it learns
 *                    that stdout is no terminal only when it first writes)
 *                    and buffers the rest until exit: a, stderr 1, stderr 2,
 *                    then b and c together.
 *   echo             copies stdin to stdout until EOF, then prints
 *                    "EOF after <n> bytes" on stderr and exits 0.
 *   enosys3          calls syscall(500) three times; prints each result
 *                    ("syscall(500) = -1 ENOSYS") and exits 0 if all failed
 *                    with ENOSYS.
 *   write_at ADDR LEN
 *                    raw write(1, ADDR, LEN) (both parsed with strtoull, any
 *                    base); prints "write = <r> <errno name>" on stderr, then
 *                    "still alive" and exits 0.
 *   oom [CHUNK]      mallocs CHUNK-byte blocks (default 64 KiB), touching
 *                    every one, until malloc returns NULL (or 1 GiB in all,
 *                    a safety cap); prints "null after <k> blocks
 *                    errno=<name>", frees everything, checks that a new
 *                    malloc then succeeds ("malloc after free ok") and exits
 *                    0 if malloc failed with ENOMEM, 1 otherwise.
 *   spin_flag        fork(); the child yields once (so the parent is surely
 *                    spinning), then sets the global flag to 1 and exits;
 *                    the parent spins WITHOUT syscalls until it sees the flag
 *                    (globals are shared in the thread-fork VM; natively the
 *                    parent would spin forever), then reaps the child and
 *                    prints "flag seen, child exited 0".
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int flag;

/* Own copy: tests/guest is not beside guest_common.h, which its image keys do not cover. */
static const char *errname(int e)
{
	switch (e) {
	case 0: return "0";
	case EFAULT: return "EFAULT";
	case ENOSYS: return "ENOSYS";
	case ENOMEM: return "ENOMEM";
	case EINVAL: return "EINVAL";
	case EBADF: return "EBADF";
	default: return "other";
	}
}

static int order(void)
{
	printf("a\n");
	if (write(2, "stderr 1\n", 9) != 9)
		return 1;
	printf("b\n");
	if (write(2, "stderr 2\n", 9) != 9)
		return 1;
	printf("c\n");
	return 0;
}

static int echo(void)
{
	char buf[4096];
	long total = 0;
	ssize_t n;

	while ((n = read(0, buf, sizeof buf)) > 0) {
		if (write(1, buf, (size_t)n) != n)
			return 1;
		total += n;
	}
	if (n < 0) {
		perror("read");
		return 1;
	}
	fprintf(stderr, "EOF after %ld bytes\n", total);
	return 0;
}

static int enosys3(void)
{
	int ok = 1;

	for (int i = 0; i < 3; i++) {
		errno = 0;
		long r = syscall(500, 1, 2, 3);
		int e = errno;
		printf("syscall(500) = %ld %s\n", r, errname(e));
		ok = ok && r == -1 && e == ENOSYS;
	}
	return ok ? 0 : 1;
}

static int write_at(const char *addr, const char *len)
{
	unsigned long long a = strtoull(addr, NULL, 0), n = strtoull(len, NULL, 0);

	errno = 0;
	long r = syscall(SYS_write, 1, (void *)(unsigned long)a, (size_t)n);
	int e = r < 0 ? errno : 0;
	fprintf(stderr, "write = %ld %s\n", r, errname(e));
	fprintf(stderr, "still alive\n");
	return 0;
}

static int oom(size_t chunk)
{
	/* errno read through a volatile pointer: clang assumes malloc leaves it alone */
	int *volatile errp = &errno;
	size_t cap = (1UL << 30) / chunk, k = 0;
	void **blocks = calloc(cap, sizeof *blocks);
	int err = 0;

	if (!blocks)
		return 2;
	for (; k < cap; k++) {
		*errp = 0;
		void *p = malloc(chunk);
		if (!p) {
			err = *errp;
			break;
		}
		memset(p, (int)(k & 0xff), chunk);
		blocks[k] = p;
	}
	printf("null after %zu blocks errno=%s\n", k, k == cap ? "none (cap reached)" : errname(err));
	for (size_t i = 0; i < k; i++)
		free(blocks[i]);
	free(blocks);
	void *again = malloc(chunk);
	printf("malloc after free %s\n", again ? "ok" : "FAILED");
	free(again);
	return k < cap && err == ENOMEM && again ? 0 : 1;
}

static int spin_flag(void)
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		sched_yield();
		flag = 1;
		_exit(0);
	}
	while (!flag)
		; /* no syscall: only preemption lets the child run */
	int status;
	if (waitpid(pid, &status, 0) != pid) {
		perror("waitpid");
		return 1;
	}
	printf("flag seen, child exited %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	if (strcmp(mode, "order") == 0)
		return order();
	if (strcmp(mode, "echo") == 0)
		return echo();
	if (strcmp(mode, "enosys3") == 0)
		return enosys3();
	if (strcmp(mode, "write_at") == 0 && argc == 4)
		return write_at(argv[2], argv[3]);
	if (strcmp(mode, "oom") == 0)
		return oom(argc > 2 ? (size_t)strtoull(argv[2], NULL, 0) : 64 << 10);
	if (strcmp(mode, "spin_flag") == 0)
		return spin_flag();
	fprintf(stderr, "usage: machine_probe order|echo|enosys3|write_at ADDR LEN|oom [CHUNK]|spin_flag\n");
	return 2;
}
