/*
 * exec_test DIR — execve errors and what survives an exec.  DIR holds
 * (see tests/test_exec.py): exec_probe; noexec (mode 644); trunc (the first
 * 200 bytes of an ELF, 755); text (755, no #!); empty.sh ("#!" alone);
 * self.sh (#! names itself); nointerp.sh (#! names a missing file);
 * script.sh ("#!DIR/exec_probe -x"); loop (a symlink to itself).
 *
 * Every failing execve runs in this very process, which must keep running;
 * then fork + exec of a #! script, what an exec keeps, and with "at",
 * fexecve and execveat relative to a directory fd.
 * Output (identical natively and in every fork mode): one line per case.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PROG "exec_test"

#include "guest_common.h"

extern char **environ;
static char dir[512];

static const char *exec_errname(int e)
{
	switch (e) {
	case ENOENT: return "ENOENT";
	case EACCES: return "EACCES";
	case ENOEXEC: return "ENOEXEC";
	case ENOTDIR: return "ENOTDIR";
	case ELOOP: return "ELOOP";
	case E2BIG: return "E2BIG";
	case EFAULT: return "EFAULT";
	default: return strerror(e);
	}
}

static void fails(const char *name, const char *path, char **args)
{
	char full[1024];
	char *dflt[] = {(char *)name, NULL};
	int r;

	snprintf(full, sizeof full, "%s%s", path[0] == '/' ? "" : dir, path);
	r = execve(full, args ? args : dflt, environ);
	printf("%s: %s\n", name, r == -1 ? exec_errname(get_errno()) : "returned?");
}

static void on_usr1(int sig)
{
	(void)sig;
}

static void run_probe(const char *path, char **args)
{
	int st;
	pid_t pid = xfork();

	if (pid == 0) {
		execve(path, args, environ);
		dprintf(2, "exec %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	st = xwaitpid(pid);
	printf("probe: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

/* fexecve (execveat with AT_EMPTY_PATH) and execveat relative to a directory fd */
static void test_execveat(const char *probe)
{
	char *args[] = {"by-fd", NULL};
	int st, fd;
	pid_t pid = xfork();

	if (pid == 0) {
		fd = open(probe, O_RDONLY);
		fexecve(fd, args, environ);
		dprintf(2, "fexecve: %s\n", strerror(errno));
		_exit(127);
	}
	st = xwaitpid(pid);
	printf("fexecve: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	pid = xfork();
	if (pid == 0) {
		fd = open(dir, O_RDONLY | O_DIRECTORY);
		syscall(SYS_execveat, fd, "exec_probe", args, environ, 0);
		dprintf(2, "execveat: %s\n", strerror(errno));
		_exit(127);
	}
	st = xwaitpid(pid);
	printf("execveat: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

static void test_kept(const char *probe)
{
	char pid_arg[32], fd_a[32], fd_c[32];
	char *args[] = {(char *)probe, pid_arg, fd_a, fd_c, "sig=10", "sig=12", NULL};
	struct sigaction sa = {0};
	int p[2], c, st;
	pid_t pid = xfork();

	if (pid == 0) {
		if (pipe2(p, O_CLOEXEC) != 0)
			DIE_ERRNO("pipe2");
		c = dup(p[0]); /* dup: no FD_CLOEXEC */
		sa.sa_handler = on_usr1;
		sigaction(SIGUSR1, &sa, NULL);
		signal(SIGUSR2, SIG_IGN);
		snprintf(pid_arg, sizeof pid_arg, "pid=%d", (int)getpid());
		snprintf(fd_a, sizeof fd_a, "fd=%d", p[1]);
		snprintf(fd_c, sizeof fd_c, "fd=%d", c);
		/* the probe prints fds by number: say which is which */
		dprintf(1, "cloexec fd=%d, plain fd=%d\n", p[1], c);
		execve(probe, args, environ);
		_exit(127);
	}
	st = xwaitpid(pid);
	printf("kept: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

int main(int argc, char **argv)
{
	char probe[1024], script[1024];
	char *big_args[3], *script_args[] = {"script.sh", "a", "b", NULL};
	char *big;

	top_pid = getpid();
	if (argc != 2 && argc != 3)
		die("usage: exec_test DIR [at]");
	snprintf(dir, sizeof dir, "%s/", argv[1]);
	snprintf(probe, sizeof probe, "%sexec_probe", dir);
	snprintf(script, sizeof script, "%sscript.sh", dir);

	fails("missing", "missing", NULL);
	fails("noexec", "noexec", NULL);
	fails("directory", "", NULL);
	fails("notdir", "exec_probe/x", NULL);
	fails("loop", "loop", NULL);
	fails("truncated", "trunc", NULL);
	fails("text", "text", NULL);
	fails("empty #!", "empty.sh", NULL);
	fails("#! itself", "self.sh", NULL);
	fails("#! missing interpreter", "nointerp.sh", NULL);
	big = malloc(200000);
	memset(big, 'x', 199999);
	big[199999] = 0;
	big_args[0] = "big";
	big_args[1] = big;
	big_args[2] = NULL;
	fails("huge argument", "exec_probe", big_args);
	free(big);
	errno = 0;
	printf("bad path: %s\n", execve((char *)1, script_args, environ) ? exec_errname(get_errno()) : "?");
	printf("bad argv: %s\n", execve(probe, (char **)1, environ) ? exec_errname(get_errno()) : "?");
	printf("still running\n");
	fflush(stdout);

	run_probe(script, script_args);
	test_kept(probe);
	if (argc == 3 && strcmp(argv[2], "at") == 0)
		test_execveat(probe);
	printf("exec_test done\n");
	return 0;
}
