/*
 * exec_swap DST SRC... — a file replaced between two execs of the same path.
 *
 * For each SRC in turn: copy it over DST (truncated, mode 0755), then fork,
 * execv(DST) in the child and wait; print "run K: exit S" with the child's
 * exit status.  The kernel keeps an exec'd program's image with its
 * translated code for the next exec of the same path (rump/spares.py): a
 * changed file at that path must run its own code, never the old one's.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static int copy(const char *src, const char *dst)
{
	char buf[65536];
	ssize_t n;
	int in = open(src, O_RDONLY), out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0755);

	if (in < 0 || out < 0)
		return -1;
	while ((n = read(in, buf, sizeof buf)) > 0)
		if (write(out, buf, n) != n)
			return -1;
	close(in);
	return close(out) || n < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
	for (int i = 2; i < argc; i++) {
		int status;
		pid_t pid;

		if (copy(argv[i], argv[1]) != 0) {
			perror("copy");
			return 1;
		}
		fflush(stdout);
		pid = fork();
		if (pid == 0) {
			execl(argv[1], argv[1], (char *)NULL);
			_exit(127);
		}
		if (pid < 0 || waitpid(pid, &status, 0) != pid) {
			perror("fork/wait");
			return 1;
		}
		printf("run %d: exit %d\n", i - 1, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	}
	return 0;
}
