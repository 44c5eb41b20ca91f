/*
 * vfork_orphan — a vfork child kills its suspended parent, then goes on.
 *
 * The child runs in its parent's memory on its parent's stack (vfork); the
 * parent dying must not pull that memory from under it (Linux keeps the mm
 * while the child uses it).  The child waits until it is an orphan, then
 * writes a line and execs exec_probe (argv[1]) with "orphan".
 *
 * Output (the parent dies of SIGKILL):  exec_probe's argv lines for "orphan"
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char *args[] = {argv[1], "orphan", NULL};
	pid_t parent = getpid();

	if (argc != 2)
		return 2;
	if (vfork() == 0) {
		kill(parent, SIGKILL);
		while (getppid() == parent)
			sched_yield();
		execv(argv[1], args);
		_exit(127);
	}
	return 3; /* never: the child killed us */
}
