/*
 * sock_pair.c — a stream socketpair shared by a parent and its forked child.
 *
 * Ping-pong, a bulk transfer (blocking partial sends), half-close with
 * shutdown, EOF, then EPIPE with MSG_NOSIGNAL and SIGPIPE without it once
 * the child is gone.  Only the parent prints, so the output is the same
 * natively and in every fork mode.
 *
 * `sock_pair bench ROUNDS MB` prints the ping-pong round trip and the stream
 * throughput instead (the comparison's socket benchmark).
 */
#define PROG "sock_pair"
#include "guest_common.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

static volatile sig_atomic_t got_pipe;

static void on_pipe(int sig)
{
	(void)sig;
	got_pipe = 1;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void child(int s, long rounds, long bulk)
{
	char buf[65536];
	long i;

	usleep(20000);
	write_full(s, "hi", 2); /* the parent waits for it in epoll_wait */
	for (i = 0; i < rounds; i++) {
		if (read_full(s, buf, 8) != 8)
			die("child: short ping");
		buf[0] ^= 0x20;
		write_full(s, buf, 8);
	}
	memset(buf, 'x', sizeof buf);
	while (bulk > 0) {
		long n = bulk < (long)sizeof buf ? bulk : (long)sizeof buf;
		write_full(s, buf, (size_t)n);
		bulk -= n;
	}
	if (shutdown(s, SHUT_WR) != 0)
		die("child: shutdown: %s", errname(get_errno()));
	/* wait for the parent's last word, then go */
	if (read_full(s, buf, 3) != 3 || memcmp(buf, "bye", 3) != 0)
		die("child: no bye");
	_exit(0);
}

int main(int argc, char **argv)
{
	int sv[2], st, ep;
	struct epoll_event ev = {EPOLLIN | EPOLLET, {.u64 = 7}};
	long rounds = 200, bulk = 1 << 20, i, got = 0;
	int bench = argc > 1 && strcmp(argv[1], "bench") == 0;
	char buf[65536];
	double t0, t1, t2;
	pid_t pid;

	top_pid = getpid();
	if (bench) {
		rounds = argc > 2 ? atol(argv[2]) : 2000;
		bulk = (argc > 3 ? atol(argv[3]) : 16) << 20;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
		DIE_ERRNO("socketpair");
	/* the epoll set is made before the fork: in VM-clone mode the parent's copy
	 * must follow its socket end into the broker */
	ep = epoll_create1(EPOLL_CLOEXEC);
	epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &ev);
	pid = xfork();
	if (pid == 0) {
		close(sv[0]);
		close(ep);
		child(sv[1], rounds, bulk);
	}
	close(sv[1]);
	{
		struct epoll_event out;

		if (epoll_wait(ep, &out, 1, -1) != 1 || read_full(sv[0], buf, 2) != 2)
			die("no greeting");
		if (!bench)
			printf("epoll_wait: data %llu in %d, greeting %.2s\n",
			       (unsigned long long)out.data.u64, !!(out.events & EPOLLIN), buf);
		close(ep);
	}
	t0 = now();
	for (i = 0; i < rounds; i++) {
		memcpy(buf, "ping0000", 8);
		buf[7] = (char)('0' + i % 10);
		write_full(sv[0], buf, 8);
		if (read_full(sv[0], buf, 8) != 8)
			die("short pong");
		if (buf[0] != 'P' || buf[7] != (char)('0' + i % 10))
			die("bad pong %.8s", buf);
	}
	t1 = now();
	for (;;) {
		ssize_t r = read(sv[0], buf, sizeof buf);
		if (r < 0)
			DIE_ERRNO("read");
		if (r == 0)
			break;
		/* every byte checked, but not in the benchmark: that would time the
		 * emulated loop, not the socket */
		for (ssize_t j = bench ? r - 1 : 0; j < r; j++)
			if (buf[j] != 'x')
				die("bad byte");
		got += r;
	}
	t2 = now();
	if (bench) {
		printf("rtt_us %.2f\n", (t1 - t0) / rounds * 1e6);
		printf("mb_per_s %.2f\n", got / (t2 - t1) / 1e6);
	} else {
		printf("ping-pong rounds %ld ok\n", rounds);
		printf("bulk bytes %ld, then EOF\n", got);
		printf("read after EOF = %zd\n", read(sv[0], buf, 1));
	}
	write_full(sv[0], "bye", 3);
	if (waitpid(pid, &st, 0) != pid)
		DIE_ERRNO("waitpid");
	if (bench)
		return 0;
	printf("child %s\n", describe_status(st));
	/* the peer is gone: EPIPE, quietly with MSG_NOSIGNAL, with SIGPIPE without */
	signal(SIGPIPE, on_pipe);
	set_errno(0);
	printf("send MSG_NOSIGNAL = %zd %s, SIGPIPE %d\n", send(sv[0], "x", 1, MSG_NOSIGNAL),
	       errname(get_errno()), (int)got_pipe);
	set_errno(0);
	printf("write = %zd %s, SIGPIPE %d\n", write(sv[0], "x", 1), errname(get_errno()),
	       (int)got_pipe);
	close(sv[0]);
	printf("done\n");
	return 0;
}
