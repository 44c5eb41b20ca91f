/*
 * stdin_sum — read standard input to EOF and print its length and checksum.
 *
 * Checks: the guest's fd 0 is the stdin the user gave `unifork run` (a file,
 * /dev/null, a pipe, a tty), in every fork mode.  With the argument "child"
 * a forked child does the reading (in VM-clone mode it runs in another VM,
 * which must read the same stdin), then the parent reads what is left (EOF).
 *
 * Output:      stdin: <bytes> bytes fnv1a=<16 hex digits>
 *   (child)    child stdin: <bytes> bytes fnv1a=<16 hex digits>
 *              parent then read 0 bytes
 * Thread-fork VM and VM-clone: identical output.
 */
#define PROG "stdin_sum"
#include <stdint.h>
#include <string.h>

#include "guest_common.h"

/* Reads fd 0 to EOF; prints its size and FNV-1a 64 checksum after `who`. */
static void sum_stdin(const char *who)
{
	static unsigned char buf[65536];
	uint64_t h = 0xcbf29ce484222325ULL;
	unsigned long long total = 0;

	for (;;) {
		ssize_t n = read(0, buf, sizeof buf);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("read: %s", strerror(errno));
		}
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i++) {
			h ^= buf[i];
			h *= 0x100000001b3ULL;
		}
		total += (unsigned long long)n;
	}
	printf("%sstdin: %llu bytes fnv1a=%016llx\n", who, total, (unsigned long long)h);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	top_pid = getpid();
	if (argc < 2 || strcmp(argv[1], "child") != 0) {
		sum_stdin("");
		return 0;
	}
	pid_t pid = fork();

	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		sum_stdin("child ");
		_exit(0);
	}
	int status;

	if (waitpid(pid, &status, 0) != pid)
		die("waitpid: %s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		die("child status %#x", status);
	char c;
	ssize_t n = read(0, &c, 1);

	printf("parent then read %zd bytes\n", n);
	return 0;
}
