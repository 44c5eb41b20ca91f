/*
 * vmclone_probe — process lifetime, console and fault probes for VM-clone
 * fork, one per mode (argv[1]).  Children never use stdio: each line goes
 * out with one write(2).
 *
 *   orphan       P makes a pipe and forks C.  C closes its write end and
 *                reads until EOF, which comes only when P has exited (P holds
 *                the other write end); then C prints
 *                "orphan alive ppid=<getppid()>" and exits 0.  P prints
 *                "parent exits 5" and exits 5 at once.
 *                VM (thread fork and VM-clone): ppid=1, C was adopted by init;
 *                the instance's status is P's (exit 5).  Natively the ppid is
 *                init's or a subreaper's.
 *   console      P forks 3 children; each prints 50 lines
 *                "pid <getpid()> line <i>" (i = 1..50), one write(2) per
 *                line, and exits 0.  P reaps them and prints
 *                "children done".
 *   block_read   P makes a pipe and forks C, which reads it: P holds the only
 *                write end and never writes, so C blocks forever.  P polls
 *                waitpid(C, WNOHANG) every 10 ms (a blocking waitpid would be
 *                a deadlock the VM reports at once) and prints how C ended:
 *                "child: killed by SIGKILL" when it is killed from outside
 *                (a test kills C's tender process).  Hangs otherwise.
 *   drop_writer  P makes a data pipe and a "go" pipe and forks R (pid P+1),
 *                then W (P+2).  W writes 1 MiB (byte i = i % 251) into the
 *                data pipe with one write(): it blocks once the pipe is full,
 *                as R does not read yet.  P polls waitpid(W, WNOHANG) every
 *                10 ms and prints "writer: <how it ended>" (a test drops W's
 *                connection: "killed by SIGKILL"); then P closes the go pipe,
 *                R reads the data pipe to EOF and prints
 *                "reader: <n> bytes, pattern ok, then EOF"; P prints
 *                "reader: exited <code>".  Hangs otherwise.
 *   spin         P prints "parent waits for a spinning child", forks C, which
 *                spins forever without a syscall, and waits for it: only a
 *                time limit ends this.
 * Exit status 0 except orphan (5); a bad mode prints usage, exits 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROG "vmclone_probe"
#define MIB (1 << 20)

#include "guest_common.h"

/* not guest_common.h's describe_status(): tests match "killed by SIGKILL" without the number */
static const char *describe(int st)
{
	static char buf[64];

	if (WIFEXITED(st))
		snprintf(buf, sizeof buf, "exited %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
		snprintf(buf, sizeof buf, "killed by SIGKILL");
	else if (WIFSIGNALED(st))
		snprintf(buf, sizeof buf, "killed by signal %d", WTERMSIG(st));
	else
		snprintf(buf, sizeof buf, "status 0x%x", st);
	return buf;
}

/* waitpid(pid, WNOHANG) every 10 ms until pid has ended; its status. */
static int poll_wait(pid_t pid)
{
	struct timespec ts = {0, 10 * 1000 * 1000};
	int st;

	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);
		if (r == pid)
			return st;
		if (r < 0 && errno != EINTR)
			DIE_ERRNO("waitpid");
		nanosleep(&ts, NULL);
	}
}

static int orphan(void)
{
	int p[2];
	char c, line[64];

	xpipe(p);
	if (xfork() == 0) {
		close(p[1]);
		while (read(p[0], &c, 1) != 0)
			;
		snprintf(line, sizeof line, "orphan alive ppid=%d\n", (int)getppid());
		say(line);
		_exit(0);
	}
	close(p[0]);
	say("parent exits 5\n");
	return 5;
}

static int console(void)
{
	char line[64];
	pid_t kids[3];

	for (int k = 0; k < 3; k++) {
		kids[k] = xfork();
		if (kids[k] == 0) {
			for (int i = 1; i <= 50; i++) {
				snprintf(line, sizeof line, "pid %d line %d\n", (int)getpid(), i);
				say(line);
			}
			_exit(0);
		}
	}
	for (int k = 0; k < 3; k++) {
		int st;
		if (waitpid(kids[k], &st, 0) != kids[k])
			DIE_ERRNO("waitpid");
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			snprintf(line, sizeof line, "child %d: %s\n", (int)kids[k], describe(st));
			say(line);
			return 1;
		}
	}
	say("children done\n");
	return 0;
}

static int block_read(void)
{
	int p[2];
	char c, line[80];

	xpipe(p);
	pid_t pid = xfork();
	if (pid == 0) {
		close(p[1]);
		ssize_t n = read(p[0], &c, 1);
		snprintf(line, sizeof line, "child: read returned %zd\n", n);
		say(line);
		_exit(3);
	}
	close(p[0]);
	snprintf(line, sizeof line, "child: %s\n", describe(poll_wait(pid)));
	say(line);
	return 0;
}

static int drop_writer(void)
{
	int d[2], g[2];
	char line[96];

	xpipe(d);
	xpipe(g);
	pid_t reader = xfork();
	if (reader == 0) {
		static unsigned char buf[1 << 16];
		char c;
		long total = 0;
		int ok = 1;

		close(d[1]);
		close(g[1]);
		while (read(g[0], &c, 1) > 0) /* wait for the go: EOF */
			;
		for (;;) {
			ssize_t n = read(d[0], buf, sizeof buf);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				DIE_ERRNO("reader: read");
			}
			if (n == 0)
				break;
			for (ssize_t i = 0; i < n; i++)
				if (buf[i] != (unsigned char)((total + i) % 251))
					ok = 0;
			total += n;
		}
		snprintf(line, sizeof line, "reader: %ld bytes, pattern %s, then EOF\n", total,
			 ok ? "ok" : "broken");
		say(line);
		_exit(0);
	}
	pid_t writer = xfork();
	if (writer == 0) {
		unsigned char *buf = malloc(MIB);

		if (buf == NULL)
			DIE_ERRNO("malloc");
		close(d[0]);
		close(g[0]);
		close(g[1]);
		for (long i = 0; i < MIB; i++)
			buf[i] = (unsigned char)(i % 251);
		ssize_t n = write(d[1], buf, MIB);
		snprintf(line, sizeof line, "writer: write returned %zd\n", n);
		say(line);
		_exit(1);
	}
	close(d[0]);
	close(d[1]);
	close(g[0]);
	snprintf(line, sizeof line, "writer: %s\n", describe(poll_wait(writer)));
	say(line);
	close(g[1]);
	int st;
	if (waitpid(reader, &st, 0) != reader)
		DIE_ERRNO("waitpid");
	snprintf(line, sizeof line, "reader: %s\n", describe(st));
	say(line);
	return 0;
}

static int spin(void)
{
	say("parent waits for a spinning child\n");
	if (xfork() == 0) {
		volatile unsigned long counter = 0;
		for (;;)
			counter++;
	}
	int st;
	wait(&st);
	say("the child ended?\n");
	return 1;
}

int main(int argc, char **argv)
{
	const char *mode = argc == 2 ? argv[1] : "";

	top_pid = getpid();
	if (strcmp(mode, "orphan") == 0)
		return orphan();
	if (strcmp(mode, "console") == 0)
		return console();
	if (strcmp(mode, "block_read") == 0)
		return block_read();
	if (strcmp(mode, "drop_writer") == 0)
		return drop_writer();
	if (strcmp(mode, "spin") == 0)
		return spin();
	fprintf(stderr, "usage: vmclone_probe orphan|console|block_read|drop_writer|spin\n");
	return 2;
}
