/*
 * sock_across.c — what a forked child can do with sockets it inherited.
 *
 * Natively and in thread fork (one kernel) everything works: the child
 * connects to a name its parent bound, accepts that connection on the
 * listening socket it inherited, and passes a pipe's read end to its parent
 * over a socketpair (the parent reads the byte the child wrote into it).  In
 * VM-clone mode the child is another VM: the name is not there
 * (ECONNREFUSED), the inherited listening socket is EOPNOTSUPP, while the
 * socketpair's bytes and the fd passed with SCM_RIGHTS cross as natively
 * (docs/semantics.md, "Across fork").  The child prints with write(2) and
 * the parent only after waiting for it, so the order is fixed.
 */
#define PROG "sock_across"
#include "guest_common.h"
#include "fdpass.h"

#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static void line(const char *what, long r)
{
	char buf[160];

	if (r < 0)
		snprintf(buf, sizeof buf, "%s = -1 %s\n", what, errname(get_errno()));
	else
		snprintf(buf, sizeof buf, "%s = %ld\n", what, r);
	say(buf);
}

int main(void)
{
	struct sockaddr_un a;
	socklen_t len;
	int l, sv[2], p[2], st;
	char buf[64];
	pid_t pid;

	top_pid = getpid();
	memset(&a, 0, sizeof a);
	a.sun_family = AF_UNIX;
	memcpy(a.sun_path + 1, "sock-across", 11);
	len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 12);
	l = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (bind(l, (struct sockaddr *)&a, len) != 0 || listen(l, 4) != 0)
		DIE_ERRNO("listen");
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
		DIE_ERRNO("socketpair");
	xpipe(p);
	pid = xfork();
	if (pid == 0) {
		int c = socket(AF_UNIX, SOCK_STREAM, 0), s;

		set_errno(0);
		line("child: connect to the parent's name", connect(c, (struct sockaddr *)&a, len));
		set_errno(0);
		s = accept(l, NULL, NULL);
		line("child: accept on the inherited listener", s);
		write_full(p[1], "x", 1);
		set_errno(0);
		line("child: sendmsg SCM_RIGHTS", send_fd(sv[1], 'f', p[0]));
		set_errno(0);
		line("child: send bytes", send(sv[1], "bytes", 5, 0));
		_exit(0);
	}
	close(sv[1]);
	waitpid(pid, &st, 0);
	{
		int fd, flags;

		set_errno(0);
		line("parent: recvmsg", recv_fd_msg(sv[0], buf, 1, MSG_DONTWAIT, &fd, &flags));
		close(p[0]);
		close(p[1]);
		buf[0] = '?';
		line("parent: read the passed pipe end", fd >= 0 ? read(fd, buf, 1) : -1);
		buf[1] = 0;
		say("parent: it holds ");
		say(buf);
		say("\n");
	}
	set_errno(0);
	line("parent: recv", recv(sv[0], buf, sizeof buf, MSG_DONTWAIT));
	printf("child %s\ndone\n", describe_status(st));
	return 0;
}
