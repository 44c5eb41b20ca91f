/*
 * sock_outbound.c — TCP connections out of the instance to a server on the
 * host (unifork run --allow-outbound).
 *
 *   sock_outbound IP ECHO_PORT CLOSED_PORT   the whole run: IP:ECHO_PORT echoes
 *                                            what it reads, nobody listens on
 *                                            IP:CLOSED_PORT
 *   sock_outbound -1 IP PORT                 one blocking connect; prints its result
 *   sock_outbound -n N IP PORT               N connections closed at once, every
 *                                            other one while still connecting
 *   sock_outbound -h N IP PORT               N connections held open: how many
 *                                            were made, and the first error
 *
 * Natively IP is 127.0.0.1; in the VM it is 10.0.2.2, the host as the guest
 * sees it.  What Linux leaves to timing on loopback (a non-blocking connect
 * that is done before it returns) is printed the same either way.
 */
#define PROG "sock_outbound"
#include "guest_common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

static struct sockaddr_in addr_of(const char *ip, const char *port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons((unsigned short)atoi(port));
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
		die("bad address %s", ip);
	return a;
}

/* A new socket connected (or connecting) to a; *err: connect's errno or 0. */
static int dial(struct sockaddr_in *a, int flags, int *err)
{
	int s = socket(AF_INET, SOCK_STREAM | flags, 0);

	if (s < 0)
		DIE_ERRNO("socket");
	set_errno(0);
	*err = connect(s, (struct sockaddr *)a, sizeof *a) == 0 ? 0 : get_errno();
	return s;
}

/* Send a line, half-close, read the echo to EOF. */
static void echo(int s, const char *who)
{
	char line[64], buf[128];
	size_t n;

	snprintf(line, sizeof line, "hello from the %s\n", who);
	write_full(s, line, strlen(line));
	shutdown(s, SHUT_WR);
	n = read_full(s, buf, sizeof buf - 1);
	buf[n] = 0;
	printf("%s: echoed %s", who, buf);
	close(s);
}

static void blocking(struct sockaddr_in *ok, struct sockaddr_in *closed)
{
	struct sockaddr_in peer;
	socklen_t len = sizeof peer;
	int err, s = dial(ok, 0, &err);

	printf("blocking connect = %s\n", errname(err));
	getpeername(s, (struct sockaddr *)&peer, &len);
	printf("  peer is the address connected to: %d\n",
	       peer.sin_port == ok->sin_port && peer.sin_addr.s_addr == ok->sin_addr.s_addr);
	SHOW_RESULT("  connect again", connect(s, (struct sockaddr *)ok, sizeof *ok));
	echo(s, "parent");
	s = dial(closed, 0, &err);
	printf("blocking connect to a closed port = %s\n", errname(err));
	SHOW_RESULT("  then send", send(s, "x", 1, MSG_NOSIGNAL));
	close(s);
}

/* Wait for a non-blocking connect; its result from SO_ERROR. */
static int settle(int s, int err)
{
	struct pollfd p = {s, POLLOUT, 0};
	socklen_t len = sizeof err;

	if (err != EINPROGRESS)
		return err; /* loopback may be done before connect returns */
	if (poll(&p, 1, 10000) != 1)
		die("poll of a connecting socket: %d", p.revents);
	if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
		DIE_ERRNO("getsockopt");
	return err;
}

static void nonblocking(struct sockaddr_in *ok, struct sockaddr_in *closed)
{
	int err, s = dial(ok, SOCK_NONBLOCK, &err);

	printf("non-blocking connect: in progress or done: %d\n", err == EINPROGRESS || !err);
	printf("  then = %s\n", errname(settle(s, err)));
	SHOW_RESULT("  connect again", connect(s, (struct sockaddr *)ok, sizeof *ok));
	fcntl(s, F_SETFL, 0);
	echo(s, "non-blocking socket");
	s = dial(closed, SOCK_NONBLOCK, &err);
	printf("non-blocking connect to a closed port, then = %s\n", errname(settle(s, err)));
	close(s);
}

int main(int argc, char **argv)
{
	struct sockaddr_in ok, closed;
	pid_t pid;

	top_pid = getpid();
	if (argc == 4 && !strcmp(argv[1], "-1")) {
		int err;

		ok = addr_of(argv[2], argv[3]);
		close(dial(&ok, 0, &err));
		printf("connect = %s\n", errname(err));
		return 0;
	}
	if (argc == 5 && !strcmp(argv[1], "-n")) {
		int i, n = atoi(argv[2]), err, made = 0;

		ok = addr_of(argv[3], argv[4]);
		for (i = 0; i < n; i++) {
			close(dial(&ok, i % 2 ? SOCK_NONBLOCK : 0, &err));
			made += !err || err == EINPROGRESS;
		}
		printf("connections made and closed: %d of %d\n", made, n);
		return 0;
	}
	if (argc == 5 && !strcmp(argv[1], "-h")) {
		int i, n = atoi(argv[2]), err = 0, made = 0;

		ok = addr_of(argv[3], argv[4]);
		for (i = 0; i < n && !err; i++) {
			int s = dial(&ok, 0, &err);

			if (err)
				close(s);
			else
				made++;
		}
		printf("connections held: %d, then %s\n", made, errname(err));
		return 0;
	}
	if (argc != 4)
		die("usage: sock_outbound IP ECHO_PORT CLOSED_PORT | -1 IP PORT");
	ok = addr_of(argv[1], argv[2]);
	closed = addr_of(argv[1], argv[3]);
	blocking(&ok, &closed);
	nonblocking(&ok, &closed);
	fflush(stdout);
	pid = xfork();
	if (pid == 0) {
		int err, s = dial(&ok, 0, &err);

		if (err)
			die("child connect: %s", errname(err));
		echo(s, "child");
		fflush(stdout);
		_exit(0);
	}
	printf("child %s\n", describe_status(xwaitpid(pid)));
	printf("done\n");
	return 0;
}
