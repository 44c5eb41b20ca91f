/*
 * poll_pingpong — how long a process waiting in poll() takes to learn that
 * another process wrote to its pipe.
 *
 * `poll_pingpong [-n ROUNDS] [-s] [-d] [-l]` forks a child; parent and child pass
 * one byte back and forth over two pipes ROUNDS times (default 200).  Each
 * side waits for its byte in poll() with no timeout (with -s: select()), then
 * reads it and writes the next one.  Event loops (servers, make's jobserver,
 * shells' co-processes) wait this way.  The parent times every round trip.
 * With -l each round is a TCP connection over loopback instead: the parent
 * connects to a listener it made before the fork and sends its byte; the
 * child, waiting in poll() on that listener, accepts, waits in poll() for the
 * byte and answers on the connection (an event-driven server's accept path).
 * With -d the parent waits for the child's byte before it sends its own (with
 * -l: for the child's end, without connecting): every process waits for ever,
 * a deadlock (natively it hangs: VMs only).
 *
 * Output:      rtt_us=<microseconds>           one line per round trip
 *              pingpong rounds=<N> ok=1
 * Exit status 0 only if every byte came back in order and the child exited 0.
 */
#define PROG "poll_pingpong"
#include "guest_common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>

static int use_select;

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Wait until fd is readable: poll() or select(), no timeout. */
static void wait_readable(int fd)
{
	if (use_select) {
		fd_set in;

		FD_ZERO(&in);
		FD_SET(fd, &in);
		if (select(fd + 1, &in, NULL, NULL, NULL) != 1 || !FD_ISSET(fd, &in))
			die("select: %s", strerror(get_errno()));
		return;
	}
	struct pollfd p = {.fd = fd, .events = POLLIN};
	if (poll(&p, 1, -1) != 1 || !(p.revents & POLLIN))
		die("poll: %s (revents %#x)", strerror(get_errno()), p.revents);
}

static unsigned char take(int fd)
{
	unsigned char b;

	wait_readable(fd);
	if (read(fd, &b, 1) != 1)
		die("read: %s", strerror(get_errno()));
	return b;
}

static void give(int fd, unsigned char b)
{
	if (write(fd, &b, 1) != 1)
		die("write: %s", strerror(get_errno()));
}

/* Round i's answer b came: check it, print the round trip since t0. */
static void round_done(long i, unsigned char b, double t0)
{
	double t1 = now_us();

	if (b != (unsigned char)(i + 1))
		die("round %ld: got %u, expected %u", i, b, (unsigned)(unsigned char)(i + 1));
	printf("rtt_us=%.3f\n", t1 - t0);
}

static int finish(pid_t pid, long rounds)
{
	int st;

	if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		die("child did not exit 0 (status %#x)", st);
	printf("pingpong rounds=%ld ok=1\n", rounds);
	return 0;
}

/* -l: one connection per round to the listener the child polls. */
static int over_tcp(long rounds, int deadlock)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof a;
	int lst = socket(AF_INET, SOCK_STREAM, 0), st;

	if (lst < 0 || bind(lst, (struct sockaddr *)&a, sizeof a) || listen(lst, 8) ||
	    getsockname(lst, (struct sockaddr *)&a, &len))
		die("listener: %s", strerror(get_errno()));
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(get_errno()));
	if (pid == 0) {
		for (long i = 0; i < rounds; i++) {
			wait_readable(lst);
			int c = accept(lst, NULL, NULL);
			if (c < 0)
				die("accept: %s", strerror(get_errno()));
			give(c, (unsigned char)(take(c) + 1));
			close(c);
		}
		_exit(0);
	}
	close(lst);
	if (deadlock) {
		printf("deadlock: the child waits in poll() for a connection, the parent for it\n");
		fflush(stdout);
		waitpid(pid, &st, 0);
		die("the child ended");
	}
	for (long i = 0; i < rounds; i++) {
		double t0 = now_us();
		int c = socket(AF_INET, SOCK_STREAM, 0);
		if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a))
			die("connect: %s", strerror(get_errno()));
		give(c, (unsigned char)i);
		unsigned char b = take(c);
		round_done(i, b, t0);
		close(c);
	}
	return finish(pid, rounds);
}

int main(int argc, char **argv)
{
	long rounds = 200;
	int opt, down[2], up[2], deadlock = 0, tcp = 0;

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "n:sdl")) != -1) {
		switch (opt) {
		case 'n': rounds = atol(optarg); break;
		case 's': use_select = 1; break;
		case 'd': deadlock = 1; break;
		case 'l': tcp = 1; break;
		default:
			fprintf(stderr, "usage: %s [-n ROUNDS] [-s] [-d] [-l]\n", argv[0]);
			return 2;
		}
	}
	if (rounds < 1)
		die("bad -n %ld", rounds);
	if (tcp)
		return over_tcp(rounds, deadlock);
	if (pipe(down) || pipe(up))
		die("pipe: %s", strerror(get_errno()));
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(get_errno()));
	if (pid == 0) {
		close(down[1]);
		close(up[0]);
		for (long i = 0; i < rounds; i++)
			give(up[1], (unsigned char)(take(down[0]) + 1));
		_exit(0);
	}
	close(down[0]);
	close(up[1]);
	if (deadlock) {
		printf("deadlock: both wait in poll()\n");
		fflush(stdout);
		take(up[0]);
		die("the child wrote first");
	}
	for (long i = 0; i < rounds; i++) {
		double t0 = now_us();
		give(down[1], (unsigned char)i);
		round_done(i, take(up[0]), t0);
	}
	return finish(pid, rounds);
}
