/*
 * vfork_orphan — a vfork child kills its suspended parent, then goes on.
 *
 * The child runs in its parent's memory on its parent's stack (vfork); the
 * parent dying must not pull that memory from under it (Linux keeps the mm
 * while the child uses it).  The child waits until it is an orphan, then
 * writes a line and execs exec_probe (argv[1]) with "orphan".
 *
 * Output (the parent dies of SIGKILL):  exec_probe's argv lines for "orphan"
 *
 * vfork_orphan term: first a helper child (fork) that waits for a pid on a
 * pipe; the vfork child kills the parent, writes its own pid on the pipe and
 * spins in the dead parent's memory, never exec'ing: the helper's SIGTERM must
 * reach it there (it dies of it).  The helper prints "helper: sent SIGTERM"
 * and exits 0.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int helper(int fd)
{
	pid_t victim;

	if (read(fd, &victim, sizeof victim) != sizeof victim)
		return 1;
	if (kill(victim, SIGTERM) != 0)
		return 2;
	printf("helper: sent SIGTERM\n");
	return 0;
}

int main(int argc, char **argv)
{
	char *args[] = {argv[1], "orphan", NULL};
	pid_t parent = getpid();
	int term, fds[2];

	if (argc != 2)
		return 2;
	term = strcmp(argv[1], "term") == 0;
	if (term) {
		if (pipe(fds) != 0)
			return 4;
		fflush(stdout);
		pid_t h = fork();
		if (h < 0)
			return 5;
		if (h == 0) {
			close(fds[1]);
			_exit(helper(fds[0]));
		}
		close(fds[0]);
	}
	if (vfork() == 0) {
		kill(parent, SIGKILL);
		while (getppid() == parent)
			sched_yield();
		if (term) {
			pid_t self = getpid();
			if (write(fds[1], &self, sizeof self) != sizeof self)
				_exit(6);
			for (;;)
				sched_yield();
		}
		execv(argv[1], args);
		_exit(127);
	}
	return 3; /* never: the child killed us */
}
