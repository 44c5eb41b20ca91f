/*
 * semantics — which parts of the parent's state does a child's write reach?
 *
 * Before fork() the parent sets up:
 *   global            a global int                                (= 1)
 *   stack             an int local on main's stack                (= 1)
 *   heap_from_stack   a malloc'd int whose pointer lives in a stack local
 *   heap_from_global  a malloc'd int whose pointer lives ONLY in a global
 *   errno             errno = EDOM
 *   fd_table          a pipe (two fds)
 * The child writes 2 into each int, sets errno = ERANGE and closes both fds
 * of the pipe, then tells the parent over a second pipe and exits.  The
 * parent reaps it and reports, for each item, whether the child's change is
 * visible (shared) or not (private).  fd_table=shared would mean the child's
 * close() closed the parent's fds too.
 *
 * Output natively (POSIX fork: everything is copied):
 *              global=private
 *              stack=private
 *              heap_from_stack=private
 *              heap_from_global=private
 *              errno=private
 *              fd_table=private
 * Thread-fork VM: "global=shared" and "heap_from_global=shared" (globals stay
 * shared, and a heap block reachable only from a global is not copied); the
 * other four lines are the same.  This is the documented difference.
 *
 * Care is taken that the compiler cannot fold the reads (volatile), and that
 * the heap_from_global block's address is not on the stack or in a register
 * at fork time (allocated in a noinline function, dead stack scrubbed), and
 * errno is accessed only through noinline get_errno()/set_errno() so that
 * the child uses its own thread pointer, not an &errno computed before fork.
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

#define PROG "semantics"

#include "guest_common.h"

volatile int g_int = 1;
volatile int *volatile g_heap; /* the only reference to its block */

static __attribute__((noinline)) void setup_heap_from_global(void)
{
	int *blk = malloc(64);

	if (!blk)
		die("malloc failed");
	memset(blk, 0, 64);
	blk[0] = 1;
	g_heap = blk;
}

/* Overwrites the dead stack below the caller's frame, where malloc() and
 * setup_heap_from_global() may have left copies of the block's address. */
static __attribute__((noinline)) void scrub_stack(void)
{
	volatile unsigned char junk[16384];

	for (size_t i = 0; i < sizeof junk; i++)
		junk[i] = 0;
}

static __attribute__((noinline)) volatile int *setup_heap_from_stack(void)
{
	int *blk = malloc(64);

	if (!blk)
		die("malloc failed");
	memset(blk, 0, 64);
	blk[0] = 1;
	return blk;
}

static const char *vis(int shared)
{
	return shared ? "shared" : "private";
}

int main(void)
{
	volatile int stack_int = 1;
	volatile int *volatile heap_from_stack; /* kept in main's frame across fork */
	int fds[2], sig[2], st, err_after, fd_shared;
	char c;
	pid_t pid;

	top_pid = getpid();
	heap_from_stack = setup_heap_from_stack();
	setup_heap_from_global();
	xpipe(fds);
	xpipe(sig);
	fflush(stdout);
	scrub_stack();
	set_errno(EDOM);
	pid = fork();
	if (pid < 0)
		DIE_ERRNO("fork");
	if (pid == 0) {
		close(sig[0]);
		g_int = 2;
		stack_int = 2;
		*heap_from_stack = 2;
		*g_heap = 2;
		close(fds[0]);
		close(fds[1]);
		set_errno(ERANGE);
		if (write(sig[1], "d", 1) != 1)
			_exit(3);
		_exit(0);
	}
	close(sig[1]);
	if (read(sig[0], &c, 1) != 1 || c != 'd')
		die("no signal from the child");
	err_after = get_errno(); /* nothing since fork() failed: errno untouched */
	close(sig[0]);
	st = xwaitpid(pid);
	expect_exit(st, 0, "child");

	if (g_int != 1 && g_int != 2)
		die("global has value %d", g_int);
	if (stack_int != 1 && stack_int != 2)
		die("stack has value %d", stack_int);
	if (*heap_from_stack != 1 && *heap_from_stack != 2)
		die("heap_from_stack has value %d", *heap_from_stack);
	if (*g_heap != 1 && *g_heap != 2)
		die("heap_from_global has value %d", *g_heap);
	if (err_after != EDOM && err_after != ERANGE)
		die("errno is %d", err_after);

	/* fd_table: are the parent's copies of the pipe still open? */
	if (write(fds[1], "p", 1) == 1) {
		if (read(fds[0], &c, 1) != 1 || c != 'p')
			die("pipe half closed: write worked, read did not");
		fd_shared = 0;
	} else if (get_errno() == EBADF) {
		fd_shared = 1;
	} else {
		DIE_ERRNO("write to the probe pipe");
	}

	printf("global=%s\n", vis(g_int == 2));
	printf("stack=%s\n", vis(stack_int == 2));
	printf("heap_from_stack=%s\n", vis(*heap_from_stack == 2));
	printf("heap_from_global=%s\n", vis(*g_heap == 2));
	printf("errno=%s\n", vis(err_after == ERANGE));
	printf("fd_table=%s\n", vis(fd_shared));
	return 0;
}
