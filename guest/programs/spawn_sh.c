/*
 * spawn_sh — a stand-in for /bin/sh in the exec tests: only what system() and
 * popen() need for their mechanics (the real shell is dash, tests/thirdparty.py).
 *
 *   spawn_sh -c "echo WORDS..."   prints WORDS
 *   spawn_sh -c "exit N"          exits with N
 *   spawn_sh -c "cat"             copies stdin to stdout
 * Anything else: "spawn_sh: unknown command" on stderr, exit 127.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *cmd;
	char buf[4096];
	ssize_t n;

	if (argc != 3 || strcmp(argv[1], "-c") != 0) {
		fprintf(stderr, "usage: spawn_sh -c COMMAND\n");
		return 2;
	}
	cmd = argv[2];
	if (strncmp(cmd, "echo ", 5) == 0) {
		printf("%s\n", cmd + 5);
		return 0;
	}
	if (strncmp(cmd, "exit ", 5) == 0)
		return atoi(cmd + 5);
	if (strcmp(cmd, "cat") == 0) {
		while ((n = read(0, buf, sizeof buf)) > 0)
			if (write(1, buf, (size_t)n) != n)
				return 1;
		return n < 0;
	}
	fprintf(stderr, "spawn_sh: unknown command: %s\n", cmd);
	return 127;
}
