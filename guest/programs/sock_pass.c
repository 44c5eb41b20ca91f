/*
 * sock_pass.c — SCM_RIGHTS over a socketpair shared across fork, both ways.
 *
 * usage: sock_pass PATH [epoll]
 *
 * Before the fork the parent sends a byte and then a pipe end with another
 * byte: the child reads both (in flight at the fork, they cross with it).
 * The child passes its parent a pipe's read end, a file it opened (PATH, the
 * offset is the open file description's: shared) and one end of a fresh
 * socketpair; the parent passes the child the same kinds, and a TCP listener
 * on 127.0.0.1 that the child accepts the parent's connection on (an fd sent
 * over that TCP connection is ignored, as Linux's tcp_sendmsg does).  Then bad input: a
 * file received by recvmsg with no room for it (MSG_CTRUNC) or by read(2) is
 * closed, and a file in flight when its receiver exits is closed too (the
 * pipe's writer sees EPIPE).  In VM-clone mode every one of these crosses VMs
 * through the supervisor (docs/semantics.md, "Across fork"), and the output
 * is the native one.  With "epoll" the child passes an epoll fd, which cannot
 * cross VMs (EOPNOTSUPP there; natively it works).
 *
 * The child prints with write(2) as it goes; the parent keeps its lines and
 * prints them after waiting for the child, so the order is fixed.
 */
#define PROG "sock_pass"
#include "guest_common.h"
#include "fdpass.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>

static char out[4096];

static void note(int child, const char *fmt, long v)
{
	char buf[200];

	snprintf(buf, sizeof buf, fmt, v);
	if (child)
		say(buf);
	else
		strncat(out, buf, sizeof out - strlen(out) - 1);
}

/* One message's byte and its fd (-1: none); ``room`` 0 gives no control buffer. */
static int recv_fd(int s, char *tag, int room, int *flags)
{
	int fd;

	if (recv_fd_msg(s, tag, room, 0, &fd, flags) != 1)
		DIE_ERRNO("recvmsg");
	return fd;
}

static void got(int who, const char *what, char tag, char c, long eof)
{
	char buf[160];

	snprintf(buf, sizeof buf, "%s: got %s with '%c', reads '%c', then %ld\n",
		 who ? "child" : "parent", what, tag, c, eof);
	if (who)
		say(buf);
	else
		strncat(out, buf, sizeof out - strlen(out) - 1);
}

/* Receive a pipe end or socket and read it: its byte, then EOF (0). */
static void take_stream(int who, int s, const char *what)
{
	char tag, c = '?', more;
	int flags, fd = recv_fd(s, &tag, 1, &flags);

	if (fd < 0)
		die("%s: no fd came", what);
	if (read(fd, &c, 1) != 1)
		c = '!';
	got(who, what, tag, c, (long)read(fd, &more, 1));
	close(fd);
}

/* Receive the file and read one byte at the shared offset. */
static int take_file(int who, int s)
{
	char tag, c = '?';
	int flags, fd = recv_fd(s, &tag, 1, &flags);

	if (fd < 0)
		die("file: no fd came");
	if (read(fd, &c, 1) != 1)
		c = '!';
	got(who, "a file", tag, c, (long)lseek(fd, 0, SEEK_CUR));
	return fd;
}

static void ack(int s)
{
	if (write(s, "k", 1) != 1)
		DIE_ERRNO("ack");
}

static void wait_ack(int s)
{
	char c;

	read_exact(s, &c, 1, "ack");
}

static void child(int s, const char *path, int epoll)
{
	int q[2], t[2], f, flags;
	char tag, c;

	if (epoll) {
		int e = epoll_create1(0);

		set_errno(0);
		long r = send_fd(s, 'x', e);
		char buf[100];

		if (r < 0)
			snprintf(buf, sizeof buf, "child: send an epoll fd = -1 %s\n",
				 errname(get_errno()));
		else
			snprintf(buf, sizeof buf, "child: send an epoll fd = %ld\n", r);
		say(buf);
		_exit(0);
	}
	/* what the parent sent before the fork, in flight then: a byte, then a byte
	 * with a pipe end; one read takes both (the files end it, as unix(7) says) */
	{
		char b[8];
		struct iovec iov = {b, sizeof b};
		union {
			char b[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} u;
		struct msghdr m = {0};
		struct cmsghdr *cm;
		int fd = -1;
		long n;

		m.msg_iov = &iov;
		m.msg_iovlen = 1;
		m.msg_control = u.b;
		m.msg_controllen = sizeof u.b;
		n = recvmsg(s, &m, 0);
		cm = CMSG_FIRSTHDR(&m);
		if (cm && cm->cmsg_type == SCM_RIGHTS)
			memcpy(&fd, CMSG_DATA(cm), sizeof(int));
		note(1, "child: recvmsg of what was in flight at the fork = %ld", n);
		c = '?';
		if (fd >= 0 && read(fd, &c, 1) != 1)
			c = '!';
		note(1, ", with an fd that reads '%c'\n", c);
		if (fd >= 0)
			close(fd);
	}
	/* child -> parent: a pipe's read end (its byte written, the write end then closed) */
	xpipe(q);
	write_full(q[1], "P", 1);
	note(1, "child: send a pipe end = %ld\n", send_fd(s, 'a', q[0]));
	close(q[0]);
	close(q[1]);
	/* a file of its own opening, at offset 5 */
	f = open(path, O_RDONLY);
	if (f < 0 || lseek(f, 5, SEEK_SET) != 5)
		DIE_ERRNO("open");
	note(1, "child: send a file = %ld\n", send_fd(s, 'b', f));
	/* one end of a fresh socketpair */
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, t) != 0)
		DIE_ERRNO("socketpair");
	note(1, "child: send a socket = %ld\n", send_fd(s, 'c', t[0]));
	close(t[0]);
	write_full(t[1], "T", 1);
	close(t[1]);
	wait_ack(s); /* the parent read the file */
	note(1, "child: my file's offset after the parent's read = %ld\n", lseek(f, 0, SEEK_CUR));
	close(f);
	/* parent -> child */
	take_stream(1, s, "a pipe end");
	f = take_file(1, s);
	close(f);
	ack(s);
	{
		int u = recv_fd(s, &tag, 1, &flags);

		note(1, "child: got a socket with '%c'\n", tag);
		write_full(u, "U", 1);
		close(u);
	}
	{
		int l = recv_fd(s, &tag, 1, &flags), a;

		note(1, "child: got a TCP listener with '%c'\n", tag);
		a = accept(l, NULL, NULL);
		note(1, "child: accept on it = %ld\n", a >= 0 ? 0 : -1);
		write_full(a, "L", 1);
		note(1, "child: an fd sent over TCP arrives as %ld (ignored)\n",
		     recv_fd(a, &tag, 1, &flags));
		close(a);
		close(l);
	}
	/* bad input: no room for the fd, then read(2): both close it */
	c = 0;
	flags = 0;
	note(1, "child: recvmsg without room gives fd %ld", recv_fd(s, &tag, 0, &flags));
	note(1, ", MSG_CTRUNC %ld\n", !!(flags & MSG_CTRUNC));
	ack(s);
	note(1, "child: read(2) of a message with an fd = %ld\n", read(s, &c, 1));
	ack(s);
	/* a last one stays unread: the child exits with it in flight */
	{
		struct pollfd pfd = {s, POLLIN, 0};

		if (poll(&pfd, 1, -1) != 1)
			DIE_ERRNO("poll");
	}
	_exit(0);
}

int main(int argc, char **argv)
{
	int sv[2], q[2], t[2], f, st, fd, flags;
	const char *path = argc > 1 ? argv[1] : "/tmp/sock_pass";
	int epoll = argc > 2 && strcmp(argv[2], "epoll") == 0;
	char tag, c;
	pid_t pid;

	top_pid = getpid();
	signal(SIGPIPE, SIG_IGN);
	f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (f < 0)
		DIE_ERRNO("open");
	write_full(f, "0123456789", 10);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
		DIE_ERRNO("socketpair");
	/* in flight at the fork: a byte, then a byte with a pipe end */
	xpipe(q);
	write_full(q[1], "Z", 1);
	write_full(sv[0], "y", 1);
	if (send_fd(sv[0], 'z', q[0]) != 1)
		DIE_ERRNO("sendmsg");
	close(q[0]);
	close(q[1]);
	pid = xfork();
	if (pid == 0) {
		close(sv[0]);
		close(f);
		child(sv[1], path, epoll);
	}
	close(sv[1]);
	if (epoll) {
		waitpid(pid, &st, 0);
		printf("child %s\ndone\n", describe_status(st));
		return 0;
	}
	/* child -> parent */
	take_stream(0, sv[0], "a pipe end");
	fd = take_file(0, sv[0]);
	ack(sv[0]);
	take_stream(0, sv[0], "a socket");
	close(fd);
	/* parent -> child: a pipe's read end, the file at offset 2, a socket */
	xpipe(q);
	write_full(q[1], "Q", 1);
	note(0, "parent: send a pipe end = %ld\n", send_fd(sv[0], 'd', q[0]));
	close(q[0]);
	close(q[1]);
	lseek(f, 2, SEEK_SET);
	note(0, "parent: send a file = %ld\n", send_fd(sv[0], 'e', f));
	wait_ack(sv[0]);
	note(0, "parent: my file's offset after the child's read = %ld\n", lseek(f, 0, SEEK_CUR));
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, t) != 0)
		DIE_ERRNO("socketpair");
	note(0, "parent: send a socket = %ld\n", send_fd(sv[0], 'f', t[1]));
	close(t[1]);
	c = '?';
	if (read(t[0], &c, 1) != 1)
		c = '!';
	note(0, "parent: the child wrote '%c' into it\n", c);
	close(t[0]);
	/* a TCP listener: the child accepts the parent's connection */
	{
		struct sockaddr_in sa = {0};
		socklen_t sl = sizeof sa;
		int l = socket(AF_INET, SOCK_STREAM, 0), cs;

		sa.sin_family = AF_INET;
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (bind(l, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(l, 4) != 0 ||
		    getsockname(l, (struct sockaddr *)&sa, &sl) != 0)
			DIE_ERRNO("listen");
		note(0, "parent: send a TCP listener = %ld\n", send_fd(sv[0], 'i', l));
		close(l);
		cs = socket(AF_INET, SOCK_STREAM, 0);
		note(0, "parent: connect to its port = %ld\n", connect(cs, (struct sockaddr *)&sa, sizeof sa));
		c = '?';
		if (read(cs, &c, 1) != 1)
			c = '!';
		note(0, "parent: the child's connection says '%c'\n", c);
		note(0, "parent: sendmsg SCM_RIGHTS over TCP = %ld\n", send_fd(cs, 'm', sv[0]));
		close(cs);
	}
	/* bad input: the child drops what it receives; the pipe's writer sees EPIPE */
	for (int i = 0; i < 2; i++) {
		xpipe(q);
		send_fd(sv[0], 'g', q[0]);
		close(q[0]);
		wait_ack(sv[0]);
		set_errno(0);
		note(0, "parent: write to the dropped pipe = %ld", write(q[1], "x", 1));
		note(0, get_errno() == EPIPE ? " (EPIPE)\n" : " (?)\n", 0);
		close(q[1]);
	}
	/* in flight when the receiver exits: a read end and another pipe's write end */
	xpipe(q);
	xpipe(t);
	{
		int two[2] = {q[0], t[1]};

		note(0, "parent: send two pipe ends the child never reads = %ld\n",
		     send_fds(sv[0], 'h', two, 2));
	}
	close(q[0]);
	close(t[1]);
	waitpid(pid, &st, 0);
	set_errno(0);
	note(0, "parent: then write to the one = %ld", write(q[1], "x", 1));
	note(0, get_errno() == EPIPE ? " (EPIPE)\n" : " (?)\n", 0);
	note(0, "parent: and read the other = %ld (EOF)\n", read(t[0], &c, 1));
	(void)tag;
	(void)flags;
	fputs(out, stdout);
	printf("child %s\ndone\n", describe_status(st));
	return 0;
}
