/*
 * Ends with the status argv[1] (default 0) through the way named by argv[2]:
 * "exit" (default, runs atexit handlers), "return" (from main), "_exit" (no
 * handlers, no stdio flush) or "abort" (SIGABRT).  stdout is flushed first so
 * that the output is the same whatever the mode.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void at_exit_handler(void)
{
	printf("atexit handler ran\n");
}

int main(int argc, char **argv)
{
	int code = argc > 1 ? atoi(argv[1]) : 0;
	const char *mode = argc > 2 ? argv[2] : "exit";

	if (atexit(at_exit_handler) != 0)
		return 99;
	printf("exit_code: code=%d mode=%s\n", code, mode);
	fflush(stdout);
	if (strcmp(mode, "return") == 0)
		return code;
	if (strcmp(mode, "_exit") == 0)
		_exit(code);
	if (strcmp(mode, "abort") == 0)
		abort();
	if (strcmp(mode, "exit") != 0) {
		fprintf(stderr, "exit_code: unknown mode %s (exit|return|_exit|abort)\n", mode);
		return 2;
	}
	exit(code);
}
