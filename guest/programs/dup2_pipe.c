/*
 * dup2_pipe — a child's stdout redirected into a pipe with dup2().
 *
 * Checks: the child dup2()s the pipe's write end onto fd 1, printf()s five
 * lines (stdio, not raw write), fflush()es and exit()s; the parent reads the
 * pipe to EOF, checks it got exactly the expected lines, prints each with a
 * prefix and checks the child's exit status 0.
 *
 * Output:      from child: line 1 of 5: stdout is a pipe now
 *              from child: line 2 of 5: printed with printf
 *              from child: line 3 of 5: 0x2a 42 -42
 *              from child: line 4 of 5: xxxxxxxx...  (100 x)
 *              from child: line 5 of 5: last line
 *              child exited 0
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

#define PROG "dup2_pipe"

#include "guest_common.h"

int main(void)
{
	int p[2], st, lines = 0;
	size_t len = 0, cap = 4096;
	char *buf, *line, *nl;
	pid_t pid;

	top_pid = getpid();
	xpipe(p);
	pid = xfork();
	if (pid == 0) {
		char xs[101];

		close(p[0]);
		if (dup2(p[1], 1) != 1)
			DIE_ERRNO("dup2");
		close(p[1]);
		memset(xs, 'x', 100);
		xs[100] = '\0';
		printf("line %d of %d: %s\n", 1, 5, "stdout is a pipe now");
		printf("line %d of %d: %s\n", 2, 5, "printed with printf");
		printf("line %d of %d: %#x %d %d\n", 3, 5, 42, 42, -42);
		printf("line %d of %d: %s\n", 4, 5, xs);
		printf("line %d of %d: %s\n", 5, 5, "last line");
		if (fflush(stdout) != 0)
			_exit(3);
		exit(0);
	}
	xclose(p[1]);
	buf = malloc(cap);
	if (!buf)
		die("malloc failed");
	for (;;) {
		size_t got;

		if (len == cap) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				die("realloc failed");
		}
		got = read_full(p[0], buf + len, cap - len);
		len += got;
		if (len < cap)
			break; /* EOF */
	}
	xclose(p[0]);
	st = xwaitpid(pid);
	if (len == 0 || buf[len - 1] != '\n')
		die("child output does not end with a newline (%zu bytes)", len);
	for (line = buf; line < buf + len; line = nl + 1) {
		char want[160];

		nl = memchr(line, '\n', (size_t)(buf + len - line));
		*nl = '\0';
		lines++;
		if (strncmp(line, "line ", 5) != 0)
			die("unexpected line from child: %s", line);
		snprintf(want, sizeof want, "line %d of 5: ", lines);
		if (strncmp(line, want, strlen(want)) != 0)
			die("line %d out of order: %s", lines, line);
		printf("from child: %s\n", line);
	}
	if (lines != 5)
		die("got %d lines from the child, expected 5", lines);
	expect_exit(st, 0, "child");
	printf("child exited 0\n");
	return 0;
}
