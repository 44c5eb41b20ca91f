/*
 * fdpass.h — bytes with file descriptors in an SCM_RIGHTS message, sent and
 * received (sock_across, sock_pass, sock_unix).  Include after guest_common.h.
 */
#ifndef FDPASS_H
#define FDPASS_H

#include <string.h>
#include <sys/socket.h>

#define FDPASS_MAX 2

/* ``len`` bytes of ``data`` with ``n`` (at most FDPASS_MAX) fds in one SCM_RIGHTS message. */
static long send_data_fds(int s, const void *data, size_t len, const int *fds, int n)
{
	struct msghdr m = {0};
	struct iovec iov = {(void *)data, len};
	union {
		char b[CMSG_SPACE(FDPASS_MAX * sizeof(int))];
		struct cmsghdr align;
	} u;
	struct cmsghdr *cm;

	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = u.b;
	m.msg_controllen = CMSG_SPACE((size_t)n * sizeof(int));
	cm = CMSG_FIRSTHDR(&m);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN((size_t)n * sizeof(int));
	memcpy(CMSG_DATA(cm), fds, (size_t)n * sizeof(int));
	return sendmsg(s, &m, 0);
}

/* One byte ``tag`` with ``n`` fds. */
static long send_fds(int s, char tag, const int *fds, int n)
{
	return send_data_fds(s, &tag, 1, fds, n);
}

static long send_fd(int s, char tag, int fd)
{
	return send_fds(s, tag, &fd, 1);
}

/*
 * recvmsg of up to ``len`` bytes into ``buf`` with room for one fd (``room`` 0:
 * no control buffer), recvmsg flags ``rflags``: its result; the fd received in
 * *fd (-1: none), the message's flags in *flags.
 */
static long recv_data_fd(int s, void *buf, size_t len, int room, int rflags, int *fd, int *flags)
{
	struct msghdr m = {0};
	struct iovec iov = {buf, len};
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct cmsghdr *cm;
	long r;

	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = room ? u.b : NULL;
	m.msg_controllen = room ? sizeof u.b : 0;
	*fd = -1;
	r = recvmsg(s, &m, rflags);
	*flags = m.msg_flags;
	if (r < 0)
		return r;
	for (cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
			memcpy(fd, CMSG_DATA(cm), sizeof(int));
	return r;
}

/* One byte into *tag with its fd (see recv_data_fd). */
static long recv_fd_msg(int s, char *tag, int room, int rflags, int *fd, int *flags)
{
	return recv_data_fd(s, tag, 1, room, rflags, fd, flags);
}

#endif
