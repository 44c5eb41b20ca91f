/*
 * sock_poll.c — readiness: poll, select, pselect, epoll (level and edge
 * triggered, a non-blocking accept loop), eventfd, timeouts and EINTR.
 *
 * One process except the last part, where a forked child writes into a pipe
 * the parent waits on with poll (no timeout).  Prints nothing that depends on
 * timing: a timeout is only checked to have passed.  The program works in the
 * directory given as the first argument.
 */
#define PROG "sock_poll"
#include "guest_common.h"

#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>

#define CHECK SHOW_RESULT

static volatile sig_atomic_t alarms;

static void on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *evs(int e)
{
	static char bufs[4][64];
	static int next;
	char *buf = bufs[next++ % 4];

	buf[0] = 0;
	if (e & POLLIN)
		strcat(buf, "IN ");
	if (e & POLLOUT)
		strcat(buf, "OUT ");
	if (e & POLLERR)
		strcat(buf, "ERR ");
	if (e & POLLHUP)
		strcat(buf, "HUP ");
	if (e & POLLNVAL)
		strcat(buf, "NVAL ");
	if (e & POLLRDHUP)
		strcat(buf, "RDHUP ");
	if (!buf[0])
		strcat(buf, "none");
	return buf;
}

static void polls(void)
{
	int p[2], sv[2];
	struct pollfd fds[4];
	double t0;
	char buf[64];

	xpipe(p);
	fds[0] = (struct pollfd){p[0], POLLIN, 0};
	fds[1] = (struct pollfd){p[1], POLLOUT, 0};
	fds[2] = (struct pollfd){-1, POLLIN, 0};
	fds[3] = (struct pollfd){99, POLLIN, 0};
	CHECK("poll empty pipe", poll(fds, 4, 0));
	printf("  r: %s w: %s neg: %s bad: %s\n", evs(fds[0].revents), evs(fds[1].revents),
	       evs(fds[2].revents), evs(fds[3].revents));
	t0 = now();
	CHECK("poll read end, 50 ms", poll(fds, 1, 50));
	printf("  waited at least 40 ms: %d\n", now() - t0 >= 0.04);
	write_full(p[1], "x", 1);
	CHECK("poll after a write", poll(fds, 2, -1));
	printf("  r: %s w: %s\n", evs(fds[0].revents), evs(fds[1].revents));
	close(p[1]);
	CHECK("poll after the writer closed", poll(fds, 1, -1));
	printf("  r: %s\n", evs(fds[0].revents));
	read(p[0], buf, sizeof buf);
	CHECK("poll drained, writer gone", poll(fds, 1, -1));
	printf("  r: %s\n", evs(fds[0].revents));
	close(p[0]);
	xpipe(p);
	close(p[0]);
	fds[1].fd = p[1];
	CHECK("poll write end, reader gone", poll(&fds[1], 1, 0));
	printf("  w: %s\n", evs(fds[1].revents));
	close(p[1]);

	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	fds[0] = (struct pollfd){sv[0], POLLIN | POLLOUT | POLLRDHUP, 0};
	CHECK("poll socket", poll(fds, 1, 0));
	printf("  %s\n", evs(fds[0].revents));
	send(sv[1], "abc", 3, 0);
	CHECK("poll socket with data", poll(fds, 1, 0));
	printf("  %s\n", evs(fds[0].revents));
	shutdown(sv[1], SHUT_WR);
	CHECK("poll socket, peer SHUT_WR", poll(fds, 1, 0));
	printf("  %s\n", evs(fds[0].revents));
	close(sv[1]);
	CHECK("poll socket, peer closed", poll(fds, 1, 0));
	printf("  %s\n", evs(fds[0].revents));
	close(sv[0]);

	fds[0] = (struct pollfd){1, POLLOUT, 0};
	CHECK("poll stdout", poll(fds, 1, 0));
	printf("  %s\n", evs(fds[0].revents));
	CHECK("poll bad pointer", poll((struct pollfd *)16, 1, 0));
	CHECK("poll too many", poll(fds, 100000, 0));
	{
		struct timespec ts = {0, 20 * 1000 * 1000};

		xpipe(p);
		fds[0] = (struct pollfd){p[0], POLLIN, 0};
		CHECK("ppoll 20 ms", ppoll(fds, 1, &ts, NULL));
		ts.tv_nsec = -1;
		CHECK("ppoll bad timespec", ppoll(fds, 1, &ts, NULL));
		close(p[0]);
		close(p[1]);
	}
}

static void selects(void)
{
	int p[2], bad;
	fd_set r, w;
	struct timeval tv;
	struct timespec ts;

	xpipe(p);
	FD_ZERO(&r);
	FD_ZERO(&w);
	FD_SET(p[0], &r);
	FD_SET(p[1], &w);
	tv = (struct timeval){0, 30000};
	CHECK("select empty pipe", select(p[1] + 1, &r, &w, NULL, &tv));
	printf("  r %d w %d\n", FD_ISSET(p[0], &r), FD_ISSET(p[1], &w));
	FD_ZERO(&r);
	FD_SET(p[0], &r);
	tv = (struct timeval){0, 30000};
	CHECK("select read end, 30 ms", select(p[0] + 1, &r, NULL, NULL, &tv));
	printf("  r %d, timeval left %ld.%06ld\n", FD_ISSET(p[0], &r), (long)tv.tv_sec, (long)tv.tv_usec);
	write_full(p[1], "y", 1);
	FD_ZERO(&r);
	FD_SET(p[0], &r);
	CHECK("select after a write", select(p[0] + 1, &r, NULL, NULL, NULL));
	printf("  r %d\n", FD_ISSET(p[0], &r));
	FD_ZERO(&r);
	FD_SET(p[0], &r);
	ts = (struct timespec){1, 0};
	CHECK("pselect ready", pselect(p[0] + 1, &r, NULL, NULL, &ts, NULL));
	/* A closed fd below 64: Linux clamps nfds to the fd table's size, so a
	 * closed fd past it (77 in a process that never had 64 fds open) is
	 * silently left out and select waits forever.  The timeout bounds it. */
	bad = dup(p[0]);
	close(bad);
	FD_ZERO(&r);
	FD_SET(bad, &r);
	tv = (struct timeval){1, 0};
	CHECK("select a closed fd", select(bad + 1, &r, NULL, NULL, &tv));
	CHECK("select negative nfds", select(-1, NULL, NULL, NULL, NULL));
	CHECK("select bad set pointer", select(3, (fd_set *)16, NULL, NULL, NULL));
	close(p[0]);
	close(p[1]);
}

static void eventfds(void)
{
	uint64_t v;
	int e = eventfd(3, EFD_NONBLOCK);
	struct pollfd f = {e, POLLIN | POLLOUT, 0};

	CHECK("poll eventfd 3", poll(&f, 1, 0));
	printf("  %s\n", evs(f.revents));
	CHECK("read eventfd", read(e, &v, 8));
	printf("  value %llu\n", (unsigned long long)v);
	CHECK("read eventfd empty", read(e, &v, 8));
	CHECK("read eventfd 4 bytes", read(e, &v, 4));
	v = 5;
	CHECK("write 5", write(e, &v, 8));
	v = 2;
	CHECK("write 2", write(e, &v, 8));
	CHECK("read", read(e, &v, 8));
	printf("  value %llu\n", (unsigned long long)v);
	v = ~0ULL;
	CHECK("write 2^64-1", write(e, &v, 8));
	v = ~0ULL - 1;
	CHECK("write max", write(e, &v, 8));
	v = 1;
	CHECK("write one more (full)", write(e, &v, 8));
	CHECK("read bad pointer", read(e, (void *)16, 8));
	close(e);
	e = eventfd(2, EFD_SEMAPHORE | EFD_NONBLOCK);
	CHECK("semaphore read", read(e, &v, 8));
	printf("  value %llu\n", (unsigned long long)v);
	CHECK("semaphore read", read(e, &v, 8));
	CHECK("semaphore read empty", read(e, &v, 8));
	close(e);
	CHECK("eventfd bad flags", eventfd(0, 0x10));
}

static socklen_t addr_of(struct sockaddr_un *a, const char *path)
{
	memset(a, 0, sizeof *a);
	a->sun_family = AF_UNIX;
	strcpy(a->sun_path, path);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path) + 1);
}

static int drain_accept(int srv, int *conns, int *n)
{
	int got = 0, c;

	while ((c = accept4(srv, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
		conns[(*n)++] = c;
		got++;
	}
	if (get_errno() != EAGAIN)
		DIE_ERRNO("accept4");
	return got;
}

static void epolls(void)
{
	struct sockaddr_un a;
	socklen_t len = addr_of(&a, "ep");
	int srv = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int ep = epoll_create1(EPOLL_CLOEXEC), conns[16], nconn = 0, clients[16], i, n, p[2];
	struct epoll_event ev, out[16];
	char buf[64];

	bind(srv, (struct sockaddr *)&a, len);
	listen(srv, 16);
	ev = (struct epoll_event){EPOLLIN | EPOLLET, {.u64 = 1000}};
	CHECK("epoll_ctl add listener (ET)", epoll_ctl(ep, EPOLL_CTL_ADD, srv, &ev));
	CHECK("epoll_ctl add again", epoll_ctl(ep, EPOLL_CTL_ADD, srv, &ev));
	CHECK("epoll_wait nothing, 20 ms", epoll_wait(ep, out, 16, 20));
	for (i = 0; i < 3; i++) {
		clients[i] = socket(AF_UNIX, SOCK_STREAM, 0);
		connect(clients[i], (struct sockaddr *)&a, len);
	}
	n = epoll_wait(ep, out, 16, -1);
	printf("epoll_wait after 3 connects = %d, data %llu events %s\n", n,
	       (unsigned long long)out[0].data.u64, evs((int)out[0].events));
	printf("  accept loop took %d\n", drain_accept(srv, conns, &nconn));
	CHECK("epoll_wait again (ET: nothing new)", epoll_wait(ep, out, 16, 0));
	clients[3] = socket(AF_UNIX, SOCK_STREAM, 0);
	connect(clients[3], (struct sockaddr *)&a, len);
	CHECK("epoll_wait after a 4th connect", epoll_wait(ep, out, 16, 0));
	printf("  accept loop took %d\n", drain_accept(srv, conns, &nconn));

	/* the accepted sockets: edge-triggered reads */
	for (i = 0; i < nconn; i++) {
		ev = (struct epoll_event){EPOLLIN | EPOLLRDHUP | EPOLLET, {.u64 = (uint64_t)i}};
		epoll_ctl(ep, EPOLL_CTL_ADD, conns[i], &ev);
	}
	send(clients[1], "0123456789", 10, 0);
	n = epoll_wait(ep, out, 16, 0);
	printf("epoll_wait after a send = %d, conn %llu %s\n", n, (unsigned long long)out[0].data.u64,
	       evs((int)out[0].events));
	CHECK("  read 4 of 10", read(conns[1], buf, 4));
	CHECK("epoll_wait (ET: the rest is not new)", epoll_wait(ep, out, 16, 0));
	send(clients[1], "ab", 2, 0);
	CHECK("epoll_wait after more data", epoll_wait(ep, out, 16, 0));
	CHECK("  read the rest", read(conns[1], buf, sizeof buf));
	CHECK("  read again", read(conns[1], buf, sizeof buf));
	close(clients[2]);
	n = epoll_wait(ep, out, 16, 0);
	printf("epoll_wait after a client closed = %d, conn %llu %s\n", n,
	       (unsigned long long)out[0].data.u64, evs((int)out[0].events));

	/* level-triggered, one-shot, modify, delete */
	ev = (struct epoll_event){EPOLLIN, {.u64 = 1}};
	CHECK("epoll_ctl mod conn 1 to level", epoll_ctl(ep, EPOLL_CTL_MOD, conns[1], &ev));
	send(clients[1], "z", 1, 0);
	CHECK("epoll_wait level", epoll_wait(ep, out, 16, 0));
	CHECK("epoll_wait level again", epoll_wait(ep, out, 16, 0));
	ev = (struct epoll_event){EPOLLIN | EPOLLONESHOT, {.u64 = 1}};
	epoll_ctl(ep, EPOLL_CTL_MOD, conns[1], &ev);
	CHECK("epoll_wait oneshot", epoll_wait(ep, out, 16, 0));
	CHECK("epoll_wait oneshot again", epoll_wait(ep, out, 16, 0));
	CHECK("epoll_ctl del", epoll_ctl(ep, EPOLL_CTL_DEL, conns[1], NULL));
	CHECK("epoll_ctl del again", epoll_ctl(ep, EPOLL_CTL_DEL, conns[1], NULL));
	CHECK("epoll_ctl mod missing", epoll_ctl(ep, EPOLL_CTL_MOD, conns[1], &ev));
	CHECK("epoll_ctl add itself", epoll_ctl(ep, EPOLL_CTL_ADD, ep, &ev));
	{
		int f = open("regular", O_CREAT | O_RDWR, 0600);

		CHECK("epoll_ctl add a regular file", epoll_ctl(ep, EPOLL_CTL_ADD, f, &ev));
		close(f);
		unlink("regular");
	}
	CHECK("epoll_ctl on a non-epoll fd", epoll_ctl(srv, EPOLL_CTL_ADD, conns[0], &ev));
	CHECK("epoll_ctl bad event pointer", epoll_ctl(ep, EPOLL_CTL_ADD, conns[0], (void *)16));
	CHECK("epoll_wait maxevents 0", epoll_wait(ep, out, 0, 0));
	CHECK("epoll_wait bad pointer", epoll_wait(ep, (void *)16, 4, 0));
	/* a closed fd leaves the set */
	xpipe(p);
	ev = (struct epoll_event){EPOLLIN, {.u64 = 77}};
	epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
	write_full(p[1], "q", 1);
	for (i = 0; i < nconn; i++)
		if (i != 1)
			epoll_ctl(ep, EPOLL_CTL_DEL, conns[i], NULL);
	n = epoll_wait(ep, out, 16, 0);
	printf("epoll_wait pipe = %d data %llu\n", n, (unsigned long long)out[0].data.u64);
	close(p[0]);
	CHECK("epoll_wait after closing it", epoll_wait(ep, out, 16, 0));
	close(p[1]);
	{
		struct pollfd f = {ep, POLLIN, 0};
		int e = eventfd(1, 0), ep2 = epoll_create1(0);

		ev = (struct epoll_event){EPOLLIN, {.u64 = 5}};
		epoll_ctl(ep2, EPOLL_CTL_ADD, e, &ev);
		f.fd = ep2;
		CHECK("poll on an epoll fd with a ready eventfd", poll(&f, 1, 0));
		close(e);
		close(ep2);
	}
	for (i = 0; i < nconn; i++)
		close(conns[i]);
	for (i = 0; i < 4; i++)
		close(clients[i]);
	close(srv);
	close(ep);
	unlink("ep");
}

static void interrupts(void)
{
	int p[2], q[2], ep = epoll_create1(0), st;
	struct pollfd f;
	struct epoll_event ev = {EPOLLIN, {0}}, out;
	struct sigaction sa;
	fd_set r;
	pid_t pid;
	char buf[32];

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART; /* poll, select and epoll_wait are never restarted */
	sigaction(SIGALRM, &sa, NULL);
	xpipe(p);
	f = (struct pollfd){p[0], POLLIN, 0};
	ualarm(20000, 0);
	CHECK("poll interrupted by SIGALRM", poll(&f, 1, -1));
	ualarm(20000, 0);
	FD_ZERO(&r);
	FD_SET(p[0], &r);
	CHECK("select interrupted", select(p[0] + 1, &r, NULL, NULL, NULL));
	epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
	ualarm(20000, 0);
	CHECK("epoll_wait interrupted", epoll_wait(ep, &out, 1, -1));
	printf("  alarms %d\n", (int)alarms);
	{
		sigset_t block, none;

		sigemptyset(&block);
		sigaddset(&block, SIGALRM);
		sigprocmask(SIG_BLOCK, &block, NULL);
		ualarm(20000, 0);
		usleep(40000); /* the alarm is pending, blocked */
		sigemptyset(&none);
		CHECK("ppoll unblocking a pending signal", ppoll(&f, 1, NULL, &none));
		printf("  alarms %d\n", (int)alarms);
		sigprocmask(SIG_UNBLOCK, &block, NULL);
	}

	/* a forked child wakes the parent's poll (and keeps its end open until told) */
	xpipe(q);
	pid = xfork();
	if (pid == 0) {
		close(q[1]);
		usleep(20000);
		write_full(p[1], "from the child", 14);
		read_full(q[0], buf, 1);
		_exit(0);
	}
	close(p[1]);
	close(q[0]);
	CHECK("poll until the child writes", poll(&f, 1, -1));
	printf("  %s\n", evs(f.revents));
	CHECK("  read", read_full(p[0], buf, 14));
	close(q[1]);
	waitpid(pid, &st, 0);
	CHECK("poll after the child exited", poll(&f, 1, -1));
	printf("  %s\n", evs(f.revents));
	printf("child %s\n", describe_status(st));
	close(p[0]);
	close(ep);
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : "/tmp";

	top_pid = getpid();
	mkdir(dir, 0700);
	if (chdir(dir) != 0)
		DIE_ERRNO("chdir");
	polls();
	selects();
	eventfds();
	epolls();
	interrupts();
	printf("done\n");
	return 0;
}
