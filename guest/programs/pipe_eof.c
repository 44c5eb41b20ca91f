/*
 * pipe_eof — read() returns 0 (EOF) only once the LAST write end is closed.
 *
 * Checks: the parent and two children A and B all hold the write end of a
 * data pipe.  Step by step, driven by command pipes (no timing):
 *   1. the parent closes its own write end (A and B still hold theirs);
 *   2. A writes a message, closes its write end and reports; the parent then
 *      reads A's message: data written before the close is still delivered;
 *   3. B writes a message while keeping its write end; the parent's blocking
 *      read returns that message, not EOF (one writer is enough);
 *   4. the parent tells B to close and immediately does a blocking read: it
 *      returns 0 only after B (the last writer) closed, which B confirms;
 *   5. both children are reaped with status 0.
 *
 * Output:      writers: parent, A, B
 *              parent closed its write end
 *              A wrote "hello from A" and closed its write end
 *              parent read "hello from A"
 *              parent read "hello from B" (B still holds its write end)
 *              parent read returned 0 (EOF) after B, the last writer, closed
 *              reaped A and B: status 0
 * Thread-fork VM: identical output.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "pipe_eof"

#include "guest_common.h"

static int data[2], ctl_a[2], ctl_b[2], report[2];

static void child(const char *name, int ctl_read)
{
	char cmd, msg[32];
	int len = snprintf(msg, sizeof msg, "hello from %s", name);

	xclose(data[0]);
	xclose(report[0]);
	for (;;) {
		if (read_full(ctl_read, &cmd, 1) != 1)
			die("%s: command pipe closed early", name);
		switch (cmd) {
		case 'w': /* write a message, keep the write end */
			write_full(data[1], msg, (size_t)len);
			write_full(report[1], "w", 1);
			break;
		case 'c': /* close the write end, report, exit */
			xclose(data[1]);
			write_full(report[1], name, 1);
			_exit(0);
		default:
			die("%s: bad command %c", name, cmd);
		}
	}
}

int main(void)
{
	pid_t a, b;
	char buf[64], rep;
	ssize_t r;

	top_pid = getpid();
	xpipe(data);
	xpipe(report);
	xpipe(ctl_a);
	a = xfork();
	if (a == 0) {
		xclose(ctl_a[1]);
		child("A", ctl_a[0]);
	}
	xclose(ctl_a[0]);
	xpipe(ctl_b);
	b = xfork();
	if (b == 0) {
		xclose(ctl_a[1]);
		xclose(ctl_b[1]);
		child("B", ctl_b[0]);
	}
	xclose(ctl_b[0]);
	xclose(report[1]);
	printf("writers: parent, A, B\n");

	/* 1 */
	xclose(data[1]);
	printf("parent closed its write end\n");

	/* 2 */
	write_full(ctl_a[1], "wc", 2);
	read_exact(report[0], &rep, 1, "A's report");
	if (rep != 'w')
		die("unexpected report %c from A", rep);
	read_exact(report[0], &rep, 1, "A's report");
	if (rep != 'A')
		die("unexpected report %c from A", rep);
	printf("A wrote \"hello from A\" and closed its write end\n");
	r = read(data[0], buf, sizeof buf - 1);
	if (r < 0)
		DIE_ERRNO("read");
	if (r == 0)
		die("read returned EOF although B still holds the write end");
	buf[r] = '\0';
	if (strcmp(buf, "hello from A") != 0)
		die("read \"%s\", expected A's message", buf);
	printf("parent read \"%s\"\n", buf);

	/* 3: B writes, but keeps its write end */
	write_full(ctl_b[1], "w", 1);
	r = read(data[0], buf, sizeof buf - 1);
	if (r < 0)
		DIE_ERRNO("read");
	if (r == 0)
		die("read returned EOF although B still holds the write end");
	buf[r] = '\0';
	if (strcmp(buf, "hello from B") != 0)
		die("read \"%s\", expected B's message", buf);
	read_exact(report[0], &rep, 1, "B's report");
	if (rep != 'w')
		die("unexpected report %c from B", rep);
	printf("parent read \"%s\" (B still holds its write end)\n", buf);

	/* 4: B closes; our blocking read can only return 0 after that */
	write_full(ctl_b[1], "c", 1);
	r = read(data[0], buf, sizeof buf - 1);
	if (r < 0)
		DIE_ERRNO("read");
	if (r != 0)
		die("read returned %zd bytes after B's message, expected EOF", r);
	read_exact(report[0], &rep, 1, "B's report");
	if (rep != 'B')
		die("unexpected report %c from B", rep);
	printf("parent read returned 0 (EOF) after B, the last writer, closed\n");
	if (read_full(report[0], &rep, 1) != 0)
		die("extra report %c", rep);

	/* 5 */
	expect_exit(xwaitpid(a), 0, "A");
	expect_exit(xwaitpid(b), 0, "B");
	printf("reaped A and B: status 0\n");
	return 0;
}
