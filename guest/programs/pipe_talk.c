/*
 * Parent and child talk over a pipe (what the thesis's listing 4.2 shows).
 *
 * The child sends three fixed-size 30-byte messages, editing its buffer
 * between them; the parent reads them one by one, prints each, then sees EOF
 * and reaps the child.  With --write-literal the child edits a string
 * *literal* in place, as the thesis's listing does: that works in a unikernel
 * (RWX memory, like Rumprun) but crashes natively, where .rodata is
 * read-only; without the flag it edits a copy, so the output is the same.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MSG_LEN 30

static const char greeting[MSG_LEN + 1] = "Hello from another unikernel!\n";

/* -1 on error for the caller's perror(), as in the thesis's listing: not guest_common.h's. */
static ssize_t read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r < 0)
			return -1;
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

static int child(int fd[2], int write_literal)
{
	/* `volatile` keeps the compiler from assuming the literal never changes. */
	char *volatile literal = (char *)"Hello from another unikernel!\n";
	char copy[MSG_LEN + 1];
	char *msg = copy;

	if (write_literal)
		msg = literal;
	else
		memcpy(copy, greeting, sizeof copy);
	close(fd[0]);
	const char first[] = {'H', 'S', 'Q'};
	for (int i = 0; i < 3; i++) {
		msg[0] = first[i];
		ssize_t n = write(fd[1], msg, MSG_LEN);
		if (n < 0) {
			perror("child: write");
			return 1;
		}
		printf("child: wrote %zd bytes\n", n);
		fflush(stdout);
	}
	close(fd[1]);
	return 0;
}

static int parent(int fd[2], pid_t pid)
{
	char buf[MSG_LEN + 1];
	ssize_t n;
	int count = 0;

	close(fd[1]);
	printf("parent: waiting to read...\n");
	fflush(stdout);
	while ((n = read_full(fd[0], buf, MSG_LEN)) > 0) {
		buf[n] = '\0';
		count++;
		printf("parent: read %zd bytes\n", n);
		printf("parent: got message %d: %s", count, buf);
		if (buf[n - 1] != '\n')
			printf("\n");
		fflush(stdout);
	}
	if (n < 0) {
		perror("parent: read");
		return 1;
	}
	printf("parent: EOF after %d messages\n", count);
	close(fd[0]);

	int status;
	if (waitpid(pid, &status, 0) != pid) {
		perror("waitpid");
		return 1;
	}
	if (WIFEXITED(status))
		printf("parent: child exited with status %d\n", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		printf("parent: child killed by signal %d\n", WTERMSIG(status));
	return count == 3 && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	int fd[2];
	int write_literal = argc > 1 && strcmp(argv[1], "--write-literal") == 0;

	if (pipe(fd) < 0) {
		perror("pipe");
		return 1;
	}
	printf("parent: pipe fds %d and %d\n", fd[0], fd[1]);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0)
		return child(fd, write_literal);
	printf("parent: fork returned a child pid\n");
	return parent(fd, pid);
}
