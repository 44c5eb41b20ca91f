/*
 * spawn_test DIR — system(), popen()/pclose(), posix_spawn() with file
 * actions, and vfork + exec; DIR holds exec_probe, and /bin/sh must run
 * "echo WORDS", "exit N" and "cat" (natively the host's shell; in a VM the
 * spawn_sh stand-in).  musl issues clone(CLONE_VM | CLONE_VFORK) for all of
 * posix_spawn, system and popen.
 *
 * Output (identical natively and in every fork mode):
 *   hi / system: exit 0 / system: exit 3 / popen read: from popen /
 *   pclose: exit 0 / through cat / pclose: exit 0 / spawn output: ... /
 *   spawn: exit 5 / spawn missing: ENOENT / vfork exec: exit 4 /
 *   spawn_test done: exec replaces it / then exec_probe's lines: it execs itself
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "spawn_test"

#include "guest_common.h"

extern char **environ;

static void status(const char *what, int st)
{
	if (st == -1)
		printf("%s: failed: %s\n", what, strerror(errno));
	else if (WIFEXITED(st))
		printf("%s: exit %d\n", what, WEXITSTATUS(st));
	else
		printf("%s: signal %d\n", what, WTERMSIG(st));
	fflush(stdout);
}

static void test_popen(void)
{
	char line[256] = "";
	FILE *f = popen("echo from popen", "r");

	if (!f)
		DIE_ERRNO("popen r");
	if (!fgets(line, sizeof line, f))
		die("popen: no line");
	printf("popen read: %s", line);
	status("pclose", pclose(f));
	f = popen("cat", "w");
	if (!f)
		DIE_ERRNO("popen w");
	fputs("through cat\n", f);
	status("pclose", pclose(f));
}

static void test_spawn(const char *probe)
{
	posix_spawn_file_actions_t fa;
	char fd_arg[32], out[4096];
	char *args[] = {(char *)probe, "spawned", "fd=5", fd_arg, "exit=5", NULL};
	int p[2], err, st;
	size_t len = 0;
	ssize_t n;
	pid_t pid;

	xpipe(p);
	snprintf(fd_arg, sizeof fd_arg, "fd=%d", p[0]);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, p[1], 1);
	posix_spawn_file_actions_addclose(&fa, p[0]);
	posix_spawn_file_actions_addclose(&fa, p[1]);
	posix_spawn_file_actions_addopen(&fa, 5, "/dev/null", O_RDONLY, 0);
	err = posix_spawn(&pid, probe, &fa, NULL, args, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (err)
		die("posix_spawn: %s", strerror(err));
	close(p[1]);
	while ((n = read(p[0], out + len, sizeof out - 1 - len)) > 0)
		len += (size_t)n;
	out[len] = 0;
	close(p[0]);
	/* the probe's argv[0] and execfn are the host-specific DIR: print the rest */
	printf("spawn output:\n%s", strstr(out, "argv[1]="));
	if (waitpid(pid, &st, 0) != pid)
		DIE_ERRNO("waitpid");
	status("spawn", st);

	args[0] = "missing";
	err = posix_spawn(&pid, "/nonexistent/missing", NULL, NULL, args, environ);
	printf("spawn missing: %s\n", err == ENOENT ? "ENOENT" : strerror(err));
}

static void test_vfork(const char *probe)
{
	char *args[] = {(char *)probe, "quiet", NULL};
	int st;
	pid_t pid;

	fflush(stdout);
	pid = vfork();
	if (pid == 0) {
		execv(probe, args);
		_exit(127);
	}
	if (pid < 0)
		DIE_ERRNO("vfork");
	st = xwaitpid(pid);
	args[1] = "exit=4";
	fflush(stdout);
	pid = vfork();
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);
		dup2(null, 1);
		execv(probe, args);
		_exit(127);
	}
	st = xwaitpid(pid);
	status("vfork exec", st);
}

int main(int argc, char **argv)
{
	char probe[1024];

	top_pid = getpid();
	if (argc != 2)
		die("usage: spawn_test DIR");
	snprintf(probe, sizeof probe, "%s/exec_probe", argv[1]);
	status("system", system("echo hi"));
	status("system", system("exit 3"));
	test_popen();
	test_spawn(probe);
	test_vfork(probe);
	printf("spawn_test done: exec replaces it\n");
	fflush(stdout);
	{
		/* the launched program itself becomes another one */
		char *args[] = {"probe", "replaced", NULL};
		execv(probe, args);
		DIE_ERRNO("execv");
	}
}
