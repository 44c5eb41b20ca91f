/*
 * sock_unix.c — AF_UNIX sockets with Linux's semantics and errnos.
 *
 * Without arguments, one process: a path server and clients, an abstract
 * name, datagrams (socketpair and bound), SCM_RIGHTS (an fd closed by the
 * sender while in flight still works), MSG_PEEK/MSG_TRUNC, shutdown,
 * socket options, non-blocking EAGAIN, and the errnos (ENOENT, ECONNREFUSED,
 * EADDRINUSE, ENOTSOCK, EAFNOSUPPORT, EFAULT...).
 *
 * `sock_unix fork DIR`: a server at DIR/srv with a forked client, and an fd
 * handed from the child to its parent over a socketpair (SCM_RIGHTS across
 * fork), which needs one kernel (native, thread fork).
 *
 * The program works in the directory given (the first argument or DIR).
 */
#define PROG "sock_unix"
#include "guest_common.h"
#include "fdpass.h"

#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>

#define CHECK SHOW_RESULT

static socklen_t addr_of(struct sockaddr_un *a, const char *path, int abstract)
{
	memset(a, 0, sizeof *a);
	a->sun_family = AF_UNIX;
	if (abstract) {
		memcpy(a->sun_path + 1, path, strlen(path));
		return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path));
	}
	strcpy(a->sun_path, path);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path) + 1);
}

/* ``data`` (a string) with ``fd`` in one SCM_RIGHTS message. */
static void send_str_fd(int s, int fd, const char *data)
{
	if (send_data_fds(s, data, strlen(data), &fd, 1) != (long)strlen(data))
		DIE_ERRNO("sendmsg");
}

/* the fd received with the message, -1 if none; the data into buf (a string) */
static int recv_str_fd(int s, char *buf, size_t n, int *flags)
{
	int fd;
	long r = recv_data_fd(s, buf, n - 1, 1, 0, &fd, flags);

	if (r < 0)
		DIE_ERRNO("recvmsg");
	buf[r] = 0;
	return fd;
}

static void one_process(void)
{
	struct sockaddr_un a, got;
	socklen_t len, glen;
	int srv, c1, c2, s1, sv[2], p[2], fd, flags, v;
	char buf[256];
	struct stat st;
	struct msghdr m;
	struct iovec iov;

	/* a path server */
	srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	len = addr_of(&a, "srv", 0);
	CHECK("connect to a missing path", connect(srv, (struct sockaddr *)&a, len));
	CHECK("bind srv", bind(srv, (struct sockaddr *)&a, len));
	CHECK("stat srv is a socket", stat("srv", &st) == 0 && S_ISSOCK(st.st_mode));
	CHECK("open srv", open("srv", O_RDONLY));
	c1 = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK("connect before listen", connect(c1, (struct sockaddr *)&a, len));
	CHECK("bind srv again", bind(c1, (struct sockaddr *)&a, len));
	CHECK("listen", listen(srv, 4));
	CHECK("connect c1", connect(c1, (struct sockaddr *)&a, len));
	CHECK("connect c1 again", connect(c1, (struct sockaddr *)&a, len));
	s1 = accept(srv, NULL, NULL);
	printf("accept = %s\n", s1 >= 0 ? "fd" : errname(get_errno()));
	glen = sizeof got;
	CHECK("getsockname srv", getsockname(srv, (struct sockaddr *)&got, &glen));
	printf("  len %u path %s\n", (unsigned)glen, got.sun_path);
	glen = sizeof got;
	CHECK("getpeername c1", getpeername(c1, (struct sockaddr *)&got, &glen));
	printf("  len %u path %s\n", (unsigned)glen, got.sun_path);
	glen = sizeof got;
	CHECK("getpeername s1 (unnamed client)", getpeername(s1, (struct sockaddr *)&got, &glen));
	printf("  len %u\n", (unsigned)glen);
	CHECK("getpeername srv", getpeername(srv, (struct sockaddr *)&got, &glen));
	CHECK("send c1", send(c1, "hello", 5, 0));
	CHECK("write c1", write(c1, " world", 6));
	CHECK("recv MSG_PEEK", recv(s1, buf, 5, MSG_PEEK));
	CHECK("read s1", read(s1, buf, sizeof buf));
	buf[11] = 0;
	printf("  got '%s'\n", buf);
	CHECK("recv nonblocking empty", recv(s1, buf, sizeof buf, MSG_DONTWAIT));
	fcntl(srv, F_SETFL, O_NONBLOCK);
	CHECK("accept on O_NONBLOCK", accept(srv, NULL, NULL));
	CHECK("shutdown c1 SHUT_WR", shutdown(c1, SHUT_WR));
	CHECK("read s1 after peer SHUT_WR", read(s1, buf, sizeof buf));
	CHECK("send on shut c1", send(c1, "x", 1, MSG_NOSIGNAL));
	CHECK("s1 still sends to c1", send(s1, "abc", 3, 0));
	CHECK("c1 reads it", read(c1, buf, sizeof buf));
	close(s1);
	CHECK("read c1 after peer close", read(c1, buf, sizeof buf));
	CHECK("send c1 after peer close", send(c1, "x", 1, MSG_NOSIGNAL));
	close(c1);
	close(srv);
	c2 = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK("connect after the server closed", connect(c2, (struct sockaddr *)&a, len));
	CHECK("bind over the dead socket's name", bind(c2, (struct sockaddr *)&a, len));
	CHECK("unlink srv", unlink("srv"));
	CHECK("bind after unlink", bind(c2, (struct sockaddr *)&a, len));
	CHECK("bind twice", bind(c2, (struct sockaddr *)&a, len));
	close(c2);
	unlink("srv");

	/* an abstract name */
	srv = socket(AF_UNIX, SOCK_STREAM, 0);
	len = addr_of(&a, "unifork-test", 1);
	CHECK("bind abstract", bind(srv, (struct sockaddr *)&a, len));
	c1 = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK("bind abstract in use", bind(c1, (struct sockaddr *)&a, len));
	CHECK("listen abstract", listen(srv, 1));
	CHECK("connect abstract", connect(c1, (struct sockaddr *)&a, len));
	glen = sizeof got;
	getpeername(c1, (struct sockaddr *)&got, &glen);
	printf("  peer len %u first byte %d name %s\n", (unsigned)glen, got.sun_path[0], got.sun_path + 1);
	close(c1);
	close(srv);

	/* datagrams */
	CHECK("socketpair dgram", socketpair(AF_UNIX, SOCK_DGRAM, 0, sv));
	CHECK("send 5", send(sv[0], "first", 5, 0));
	CHECK("send 6", send(sv[0], "second", 6, 0));
	CHECK("recv 3 of first", recv(sv[1], buf, 3, 0));
	CHECK("recv MSG_TRUNC", recv(sv[1], buf, 3, MSG_TRUNC));
	memset(&m, 0, sizeof m);
	CHECK("send 7", send(sv[0], "seventh", 7, 0));
	iov.iov_base = buf;
	iov.iov_len = 4;
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	CHECK("recvmsg 4 of 7", recvmsg(sv[1], &m, 0));
	printf("  MSG_TRUNC %d\n", !!(m.msg_flags & MSG_TRUNC));
	CHECK("recv empty nonblocking", recv(sv[1], buf, sizeof buf, MSG_DONTWAIT));
	close(sv[0]);
	close(sv[1]);
	{
		int d1 = socket(AF_UNIX, SOCK_DGRAM, 0), d2 = socket(AF_UNIX, SOCK_DGRAM, 0);
		struct sockaddr_un b;
		socklen_t blen = addr_of(&b, "dg", 0);

		CHECK("bind dg", bind(d1, (struct sockaddr *)&b, blen));
		CHECK("sendto dg", sendto(d2, "to-dg", 5, 0, (struct sockaddr *)&b, blen));
		CHECK("send unconnected", send(d2, "x", 1, 0));
		glen = sizeof got;
		memset(&got, 0, sizeof got);
		CHECK("recvfrom dg", recvfrom(d1, buf, sizeof buf, 0, (struct sockaddr *)&got, &glen));
		printf("  from len %u\n", (unsigned)glen);
		CHECK("listen on dgram", listen(d1, 1));
		CHECK("stream connect to dgram", connect(socket(AF_UNIX, SOCK_STREAM, 0), (struct sockaddr *)&b, blen));
		close(d1);
		CHECK("sendto closed dg", sendto(d2, "x", 1, 0, (struct sockaddr *)&b, blen));
		close(d2);
		unlink("dg");
	}

	/* SCM_RIGHTS: a pipe's read end, closed by the sender while in flight */
	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	xpipe(p);
	send_str_fd(sv[0], p[0], "fd");
	close(p[0]);
	write_full(p[1], "through the passed fd", 21);
	close(p[1]);
	fd = recv_str_fd(sv[1], buf, sizeof buf, &flags);
	printf("recvmsg data '%s' got fd %s ctrunc %d\n", buf, fd >= 0 ? "yes" : "no", !!(flags & MSG_CTRUNC));
	memset(buf, 0, sizeof buf);
	CHECK("read the passed fd", read(fd, buf, sizeof buf));
	printf("  '%s'\n", buf);
	close(fd);
	/* data without room for the control message: the fd is dropped, MSG_CTRUNC */
	xpipe(p);
	send_str_fd(sv[0], p[1], "x");
	close(p[1]);
	memset(&m, 0, sizeof m);
	iov.iov_base = buf;
	iov.iov_len = sizeof buf;
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	CHECK("recvmsg without control room", recvmsg(sv[1], &m, 0));
	printf("  MSG_CTRUNC %d controllen %zu\n", !!(m.msg_flags & MSG_CTRUNC), (size_t)m.msg_controllen);
	CHECK("the dropped write end left EOF", read(p[0], buf, 1));
	close(p[0]);
	CHECK("read after an fd message on a stream", send(sv[0], "more", 4, 0));
	CHECK("  read", read(sv[1], buf, sizeof buf));
	{
		int bad = 999;
		struct cmsghdr *c;
		union {
			char b[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} u;

		memset(&m, 0, sizeof m);
		iov.iov_base = "y";
		iov.iov_len = 1;
		m.msg_iov = &iov;
		m.msg_iovlen = 1;
		m.msg_control = u.b;
		m.msg_controllen = sizeof u.b;
		c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &bad, sizeof bad);
		CHECK("sendmsg with a bad fd", sendmsg(sv[0], &m, 0));
		m.msg_control = (void *)16;
		CHECK("sendmsg with a bad control pointer", syscall(SYS_sendmsg, sv[0], &m, 0));
	}

	/* options */
	v = 1;
	CHECK("setsockopt SO_REUSEADDR", setsockopt(sv[0], SOL_SOCKET, SO_REUSEADDR, &v, sizeof v));
	len = sizeof v;
	v = 0;
	CHECK("getsockopt SO_REUSEADDR", getsockopt(sv[0], SOL_SOCKET, SO_REUSEADDR, &v, &len));
	printf("  %d\n", v);
	len = sizeof v;
	CHECK("getsockopt SO_TYPE", getsockopt(sv[0], SOL_SOCKET, SO_TYPE, &v, &len));
	printf("  %d len %u\n", v, (unsigned)len);
	len = sizeof v;
	CHECK("getsockopt SO_ERROR", getsockopt(sv[0], SOL_SOCKET, SO_ERROR, &v, &len));
	printf("  %d\n", v);
	v = 65536;
	CHECK("setsockopt SO_SNDBUF 65536", setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &v, sizeof v));
	len = sizeof v;
	CHECK("getsockopt SO_SNDBUF", getsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &v, &len));
	printf("  %d\n", v);
	CHECK("setsockopt short", setsockopt(sv[0], SOL_SOCKET, SO_KEEPALIVE, &v, 2));
	CHECK("setsockopt SO_TYPE", setsockopt(sv[0], SOL_SOCKET, SO_TYPE, &v, sizeof v));
	CHECK("getsockopt bad pointer", getsockopt(sv[0], SOL_SOCKET, SO_TYPE, (void *)16, &len));

	/* non-blocking send until full */
	fcntl(sv[0], F_SETFL, O_NONBLOCK);
	{
		static char big[65536];
		long total = 0;
		ssize_t w;

		while ((w = send(sv[0], big, sizeof big, 0)) > 0)
			total += w;
		printf("nonblocking send filled %s, then %s\n", total > 0 ? "some" : "none", errname(get_errno()));
	}
	close(sv[0]);
	close(sv[1]);

	/* errnos */
	CHECK("socket unknown family", socket(110, SOCK_STREAM, 0));
	CHECK("socket bad type", socket(AF_UNIX, 9, 0));
	CHECK("socket bad flags", socket(AF_UNIX, SOCK_STREAM | 0x100, 0));
	CHECK("socket bad protocol", socket(AF_UNIX, SOCK_STREAM, 7));
	xpipe(p);
	CHECK("send on a pipe", send(p[1], "x", 1, 0));
	CHECK("accept on a pipe", accept(p[0], NULL, NULL));
	CHECK("getsockopt on a pipe", getsockopt(p[0], SOL_SOCKET, SO_TYPE, &v, &len));
	close(p[0]);
	close(p[1]);
	CHECK("bind on a bad fd", bind(77, (struct sockaddr *)&a, len));
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	CHECK("bind bad pointer", bind(fd, (struct sockaddr *)16, sizeof a));
	CHECK("bind huge length", bind(fd, (struct sockaddr *)&a, 100000));
	CHECK("bind short length", bind(fd, (struct sockaddr *)&a, 1));
	CHECK("socketpair bad pointer", socketpair(AF_UNIX, SOCK_STREAM, 0, (int *)16));
	CHECK("listen unbound", listen(fd, 1));
	CHECK("read unconnected", read(fd, buf, 1));
	CHECK("write unconnected", send(fd, "x", 1, MSG_NOSIGNAL));
	CHECK("shutdown unconnected", shutdown(fd, SHUT_RDWR));
	close(fd);
	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	CHECK("send bad pointer", send(sv[0], (void *)16, 10, 0));
	CHECK("send huge length, bad pointer", send(sv[0], buf, 0x7fffffff, MSG_DONTWAIT));
	CHECK("send 3", send(sv[0], "abc", 3, 0));
	CHECK("recv into a bad pointer", recv(sv[1], (void *)16, 3, 0));
	CHECK("the bytes are still there", recv(sv[1], buf, sizeof buf, 0));
	CHECK("shutdown bad how", shutdown(sv[0], 7));
	close(sv[0]);
	close(sv[1]);
}

static void forked(void)
{
	struct sockaddr_un a;
	socklen_t len = addr_of(&a, "srv", 0);
	int srv = socket(AF_UNIX, SOCK_STREAM, 0), s, sv[2], fd, flags, st;
	char buf[128];
	pid_t pid;
	ssize_t r;

	if (bind(srv, (struct sockaddr *)&a, len) != 0 || listen(srv, 8) != 0)
		DIE_ERRNO("server");
	pid = xfork();
	if (pid == 0) {
		int c = socket(AF_UNIX, SOCK_STREAM, 0);

		close(srv);
		if (connect(c, (struct sockaddr *)&a, len) != 0)
			_exit(10 + get_errno());
		write_full(c, "request from the child", 22);
		if (read_full(c, buf, 5) != 5)
			_exit(3);
		_exit(memcmp(buf, "reply", 5) == 0 ? 0 : 4);
	}
	s = accept(srv, NULL, NULL);
	if (s < 0)
		DIE_ERRNO("accept");
	r = read(s, buf, sizeof buf - 1);
	buf[r > 0 ? r : 0] = 0;
	printf("server got '%s'\n", buf);
	write_full(s, "reply", 5);
	waitpid(pid, &st, 0);
	printf("client %s\n", describe_status(st));
	close(s);
	close(srv);
	unlink("srv");

	/* SCM_RIGHTS across fork: the child opens a file and passes it up */
	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	pid = xfork();
	if (pid == 0) {
		int f = open("passed.txt", O_CREAT | O_RDWR | O_TRUNC, 0600);

		write_full(f, "written by the child\n", 21);
		lseek(f, 0, SEEK_SET);
		send_str_fd(sv[1], f, "here");
		close(f);
		_exit(0);
	}
	waitpid(pid, &st, 0);
	fd = recv_str_fd(sv[0], buf, sizeof buf, &flags);
	printf("child %s, sent '%s' with fd %s\n", describe_status(st), buf, fd >= 0 ? "yes" : "no");
	r = read(fd, buf, sizeof buf - 1);
	buf[r > 0 ? r : 0] = 0;
	printf("  the child's file says: %s", buf);
	close(fd);
	unlink("passed.txt");
	close(sv[0]);
	close(sv[1]);
}

int main(int argc, char **argv)
{
	const char *dir = argc > 2 ? argv[2] : argc > 1 && strcmp(argv[1], "fork") != 0 ? argv[1] : "/tmp";

	top_pid = getpid();
	mkdir(dir, 0700);
	if (chdir(dir) != 0)
		DIE_ERRNO("chdir");
	if (argc > 1 && strcmp(argv[1], "fork") == 0)
		forked();
	else
		one_process();
	printf("done\n");
	return 0;
}
