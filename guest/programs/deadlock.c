/*
 * deadlock — a guaranteed deadlock, for the VM kernel to detect.
 *
 * With --forever: the only process creates a pipe and read()s it while it
 * still holds the write end itself; nobody else can ever write, so the read
 * blocks forever (natively it really hangs).  The VM's kernel must notice
 * that no runnable process is left and report the deadlock.
 * Output (--forever): deadlock: reading a pipe whose only writer is myself
 *                     (then nothing; should the read ever return, it says so
 *                     on stderr and exits 1)
 * Without --forever: prints usage on stderr, nothing on stdout, exits 2 (so
 * that a native test can run it safely).
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

#define PROG "deadlock"

#include "guest_common.h"

int main(int argc, char **argv)
{
	int p[2];
	char c;
	ssize_t r;

	top_pid = getpid();
	if (argc != 2 || strcmp(argv[1], "--forever") != 0) {
		fprintf(stderr, "usage: %s --forever   (blocks forever: reads a pipe it alone "
				"can write)\n", argv[0]);
		return 2;
	}
	xpipe(p);
	printf("deadlock: reading a pipe whose only writer is myself\n");
	fflush(stdout);
	r = read(p[0], &c, 1);
	die("read returned %zd (errno %d): the deadlock was not a deadlock", r, r < 0 ? errno : 0);
	return 1;
}
