/*
 * sock_inet.c — TCP and UDP over loopback (127.0.0.1 and ::1) between a
 * process and its forked child, and within one process.
 *
 * Ports are ephemeral (bind to port 0, then getsockname), so nothing printed
 * depends on the port numbers or on what else the host runs; natively the
 * host's loopback is used, in the VM the instance's private network
 * (thread fork: one kernel).  The child prints nothing; the parent prints
 * after each step.
 */
#define PROG "sock_inet"
#include "guest_common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define CHECK(what, expr)                                                                  \
	do {                                                                               \
		long r_;                                                                   \
		set_errno(0);                                                              \
		r_ = (long)(expr);                                                         \
		if (r_ < 0)                                                                \
			printf("%s = -1 %s\n", what, errname(get_errno()));               \
		else                                                                       \
			printf("%s = %ld\n", what, r_);                                    \
	} while (0)

static struct sockaddr_in lo4(unsigned short port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static unsigned short port_of(int s)
{
	struct sockaddr_storage a;
	socklen_t len = sizeof a;

	if (getsockname(s, (struct sockaddr *)&a, &len) != 0)
		DIE_ERRNO("getsockname");
	return ntohs(a.ss_family == AF_INET ? ((struct sockaddr_in *)&a)->sin_port
					    : ((struct sockaddr_in6 *)&a)->sin6_port);
}

static void tcp4(void)
{
	struct sockaddr_in a = lo4(0), peer;
	socklen_t len = sizeof peer;
	int srv = socket(AF_INET, SOCK_STREAM, 0), s, st, v = 1;
	unsigned short port;
	char buf[64];
	pid_t pid;

	CHECK("setsockopt SO_REUSEADDR", setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &v, sizeof v));
	CHECK("bind 127.0.0.1:0", bind(srv, (struct sockaddr *)&a, sizeof a));
	port = port_of(srv);
	printf("ephemeral port in range: %d\n", port >= 1024);
	CHECK("listen", listen(srv, 8));
	{
		int other = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in same = lo4(port);

		CHECK("bind the same port", bind(other, (struct sockaddr *)&same, sizeof same));
		close(other);
	}
	pid = xfork();
	if (pid == 0) {
		int c = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in to = lo4(port);

		close(srv);
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &v, sizeof v);
		if (connect(c, (struct sockaddr *)&to, sizeof to) != 0)
			_exit(10 + get_errno());
		write_full(c, "GET / HTTP/1.0\r\n\r\n", 18);
		if (read_full(c, buf, 11) != 11 || memcmp(buf, "HTTP/1.0 OK", 11) != 0)
			_exit(3);
		_exit(read(c, buf, 1) == 0 ? 0 : 4);
	}
	s = accept(srv, (struct sockaddr *)&peer, &len);
	printf("accept: %s, peer family %d addr %s len %u\n", s >= 0 ? "fd" : errname(get_errno()),
	       peer.sin_family, inet_ntoa(peer.sin_addr), (unsigned)len);
	memset(buf, 0, sizeof buf);
	read_full(s, buf, 18);
	printf("server got '%.14s'\n", buf);
	len = sizeof peer;
	getsockname(s, (struct sockaddr *)&peer, &len);
	printf("accepted socket's name: %s, same port %d\n", inet_ntoa(peer.sin_addr),
	       ntohs(peer.sin_port) == port);
	write_full(s, "HTTP/1.0 OK", 11);
	close(s);
	waitpid(pid, &st, 0);
	printf("client %s\n", describe_status(st));
	v = 0;
	len = sizeof v;
	CHECK("getsockopt SO_TYPE", getsockopt(srv, SOL_SOCKET, SO_TYPE, &v, &len));
	printf("  %d\n", v);
	len = sizeof v;
	CHECK("getsockopt SO_PROTOCOL", getsockopt(srv, SOL_SOCKET, SO_PROTOCOL, &v, &len));
	printf("  %d\n", v);
	close(srv);

	/* a port nobody listens on any more */
	srv = socket(AF_INET, SOCK_STREAM, 0);
	a = lo4(0);
	bind(srv, (struct sockaddr *)&a, sizeof a);
	port = port_of(srv);
	close(srv);
	s = socket(AF_INET, SOCK_STREAM, 0);
	a = lo4(port);
	CHECK("connect to a closed port", connect(s, (struct sockaddr *)&a, sizeof a));
	close(s);
	s = socket(AF_INET, SOCK_STREAM, 0);
	CHECK("recv unconnected", recv(s, buf, 1, 0));
	CHECK("shutdown unconnected", shutdown(s, SHUT_RDWR));
	CHECK("bind AF_INET6 address to AF_INET", bind(s, (struct sockaddr *)&a, 1));
	close(s);
}

static void nonblocking(void)
{
	struct sockaddr_in a = lo4(0);
	int srv = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), c, s;
	struct pollfd f;
	socklen_t len;
	int err = -1;

	bind(srv, (struct sockaddr *)&a, sizeof a);
	listen(srv, 4);
	a = lo4(port_of(srv));
	CHECK("accept, nobody yet", accept(srv, NULL, NULL));
	c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	set_errno(0);
	if (connect(c, (struct sockaddr *)&a, sizeof a) == 0 || get_errno() == EINPROGRESS)
		printf("nonblocking connect: 0 or EINPROGRESS\n");
	else
		printf("nonblocking connect: %s\n", errname(get_errno()));
	f = (struct pollfd){c, POLLOUT, 0};
	CHECK("poll for the connection", poll(&f, 1, 5000));
	len = sizeof err;
	getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &len);
	printf("  SO_ERROR %d\n", err);
	f = (struct pollfd){srv, POLLIN, 0};
	CHECK("poll the listener", poll(&f, 1, 5000));
	s = accept(srv, NULL, NULL);
	printf("accept: %s\n", s >= 0 ? "fd" : errname(get_errno()));
	CHECK("send", send(c, "abc", 3, 0));
	f = (struct pollfd){s, POLLIN, 0};
	poll(&f, 1, 5000);
	{
		char buf[8];
		CHECK("recv", recv(s, buf, sizeof buf, 0));
		CHECK("recv again", recv(s, buf, sizeof buf, MSG_DONTWAIT));
	}
	close(c);
	close(s);
	close(srv);
}

static void udp(void)
{
	struct sockaddr_in a = lo4(0), from;
	socklen_t len = sizeof from;
	int u1 = socket(AF_INET, SOCK_DGRAM, 0), u2 = socket(AF_INET, SOCK_DGRAM, 0);
	unsigned short p1;
	char buf[64];
	struct pollfd f = {u1, POLLIN, 0};

	CHECK("bind udp", bind(u1, (struct sockaddr *)&a, sizeof a));
	p1 = port_of(u1);
	a = lo4(p1);
	CHECK("sendto", sendto(u2, "datagram one", 12, 0, (struct sockaddr *)&a, sizeof a));
	CHECK("sendto", sendto(u2, "two", 3, 0, (struct sockaddr *)&a, sizeof a));
	CHECK("poll udp", poll(&f, 1, 5000));
	CHECK("recvfrom", recvfrom(u1, buf, sizeof buf, 0, (struct sockaddr *)&from, &len));
	printf("  from %s, the sender's port %d, len %u\n", inet_ntoa(from.sin_addr),
	       ntohs(from.sin_port) == port_of(u2), (unsigned)len);
	CHECK("recv 2 of 3 (truncated)", recv(u1, buf, 2, 0));
	CHECK("recv empty", recv(u1, buf, sizeof buf, MSG_DONTWAIT));
	/* echo back to the sender */
	CHECK("sendto the sender", sendto(u1, "echo", 4, 0, (struct sockaddr *)&from, len));
	f.fd = u2;
	poll(&f, 1, 5000);
	CHECK("recv the echo", recv(u2, buf, sizeof buf, 0));
	CHECK("connect udp", connect(u2, (struct sockaddr *)&a, sizeof a));
	CHECK("send connected", send(u2, "x", 1, 0));
	f.fd = u1;
	poll(&f, 1, 5000);
	CHECK("recv", recv(u1, buf, sizeof buf, 0));
	close(u1);
	close(u2);
}

static void tcp6(void)
{
	struct sockaddr_in6 a, b;
	socklen_t len = sizeof b;
	int srv = socket(AF_INET6, SOCK_STREAM, 0), c, s;
	char buf[32], text[64];

	memset(&a, 0, sizeof a);
	a.sin6_family = AF_INET6;
	a.sin6_addr = in6addr_loopback;
	CHECK("bind [::1]:0", bind(srv, (struct sockaddr *)&a, sizeof a));
	listen(srv, 1);
	a.sin6_port = htons(port_of(srv));
	c = socket(AF_INET6, SOCK_STREAM, 0);
	CHECK("connect [::1]", connect(c, (struct sockaddr *)&a, sizeof a));
	s = accept(srv, (struct sockaddr *)&b, &len);
	inet_ntop(AF_INET6, &b.sin6_addr, text, sizeof text);
	printf("accept: peer %s len %u\n", text, (unsigned)len);
	CHECK("send", send(c, "six", 3, 0));
	CHECK("recv", recv(s, buf, sizeof buf, 0));
	close(c);
	CHECK("recv after close", recv(s, buf, sizeof buf, 0));
	close(s);
	close(srv);
}

int main(void)
{
	top_pid = getpid();
	tcp4();
	nonblocking();
	udp();
	tcp6();
	printf("done\n");
	return 0;
}
