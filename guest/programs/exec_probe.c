/*
 * exec_probe — the program the exec tests run (exec_test, spawn_test, exec_loop).
 *
 * `exec_probe quiet` exits 0 at once (exec latency loops).  Otherwise it
 * prints what a new program can check about how it was started:
 *   argv[i]=...          every argument, in order
 *   execfn=...           getauxval(AT_EXECFN): the path given to execve
 *   pid=same|other       if argv holds "pid=N": is getpid() still N?
 *   fd N: open|closed    for each "fd=N" argument
 *   sig N: default|ignored|handler   for each "sig=N" argument
 * and, with "exit=N", exits with N.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int i, code = 0;

	if (argc > 1 && strcmp(argv[1], "quiet") == 0)
		return 0;
	for (i = 0; i < argc; i++) /* not a pid: it differs from run to run */
		printf("argv[%d]=%s\n", i, strncmp(argv[i], "pid=", 4) ? argv[i] : "pid=N");
	printf("execfn=%s\n", (const char *)getauxval(AT_EXECFN));
	for (i = 1; i < argc; i++) {
		if (strncmp(argv[i], "pid=", 4) == 0) {
			printf("pid=%s\n", atoi(argv[i] + 4) == getpid() ? "same" : "other");
		} else if (strncmp(argv[i], "fd=", 3) == 0) {
			int fd = atoi(argv[i] + 3);
			printf("fd %d: %s\n", fd, fcntl(fd, F_GETFD) < 0 ? "closed" : "open");
		} else if (strncmp(argv[i], "sig=", 4) == 0) {
			int sig = atoi(argv[i] + 4);
			struct sigaction sa;
			sigaction(sig, NULL, &sa);
			printf("sig %d: %s\n", sig,
			       sa.sa_handler == SIG_DFL   ? "default"
			       : sa.sa_handler == SIG_IGN ? "ignored"
							  : "handler");
		} else if (strncmp(argv[i], "exit=", 5) == 0) {
			code = atoi(argv[i] + 5);
		}
	}
	return code;
}
