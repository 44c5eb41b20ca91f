/*
 * vfork_test — vfork() followed by _exit() in the child.
 *
 * Checks: vfork() returns 0 in the child, which immediately does _exit(7);
 * the parent gets the child's pid, reaps it with waitpid() and checks
 * WIFEXITED && WEXITSTATUS == 7.  (Nothing else is done in the child: that is
 * all vfork() allows.)
 *
 * Output:      vfork ok
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

#define PROG "vfork_test"

#include "guest_common.h"

int main(void)
{
	pid_t pid;
	int st;

	top_pid = getpid();
	fflush(stdout);
	pid = vfork();
	if (pid == 0)
		_exit(7);
	if (pid < 0)
		DIE_ERRNO("vfork");
	st = xwaitpid(pid);
	expect_exit(st, 7, "vfork child");
	printf("vfork ok\n");
	return 0;
}
