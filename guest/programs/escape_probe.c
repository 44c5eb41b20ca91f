/*
 * escape_probe — tries, one way after another, to reach outside the VM, and
 * prints exactly what each attempt got: "<attempt> = <ret>" on success,
 * "<attempt> = -1 <ERRNO>" on failure, "<attempt>: <how a child ended>" for
 * attempts made in a forked child.  tests/test_isolation.py runs it in a VM
 * (thread fork and VM-clone) and natively (the positive control: natively
 * the same attempts DO reach the host, so the probe would see an escape).
 * Every line goes out with one write(2), never through stdio (in a
 * thread-fork VM the stdio buffers are globals shared with the children).
 *
 *   files DIR      host files.  Read-only attempts on fixed host paths
 *                  (/etc/passwd, /proc/self/mem, traversal, a path cut by a
 *                  NUL, over-long paths...); on success the first bytes of a
 *                  regular file are printed as "  read <n>: <text>".  Then
 *                  attempts that would change the host, all under DIR (a
 *                  host directory the test made, holding the files "secret",
 *                  "victim", "moveme" and the directory "subdir"): create,
 *                  truncate, append, mkdir, rmdir, unlink, rename, link,
 *                  symlink, chmod, chown, mknod, utimensat, setxattr, chdir.
 *                  VM only (natively they would act on the host's mounts or
 *                  processes): chroot, mount, umount2, pivot_root, acct.
 *   paths          open/stat/access of the VM's own devices through every
 *                  spelling Linux accepts or refuses (dev/null, //dev//null,
 *                  /dev/../dev/null, /dev/null/.., O_CREAT|O_EXCL,
 *                  O_DIRECTORY, openat with a non-directory or bad dirfd):
 *                  the output must be the same natively (run in /) and in
 *                  the VM.
 *   sockets TCPPORT UNIXPATH UDPPORT
 *                  socket() of every family the host could reach (INET,
 *                  INET6, UNIX, NETLINK, PACKET, raw ICMP), connect() to the
 *                  test's TCP listener on 127.0.0.1:TCPPORT (also through
 *                  ::ffff:127.0.0.1) and Unix listener UNIXPATH, sendto() of
 *                  its UDP socket 127.0.0.1:UDPPORT, bind+listen, socketpair,
 *                  connect/sendto on the console fd 1.
 *   procs HOSTPID MARKER
 *                  VM only (natively it would kill the test and everything
 *                  else): execve of /bin/sh (asked to create MARKER),
 *                  ptrace, process_vm_readv/writev, kill/tkill/tgkill/pidfd
 *                  of HOSTPID (the tender's host pid), of pid 1 and of the
 *                  group -HOSTPID; host-wide syscalls (sethostname, reboot,
 *                  clock_settime, init_module, iopl, io_uring_setup, bpf...);
 *                  last kill(-1, SIGKILL) with a child blocked on a pipe:
 *                  "kill(-1, SIGKILL) = 0", then "child after kill(-1):
 *                  killed by signal 9" (Linux signals every process but init
 *                  and the caller), then "still alive".
 *   memory ADDR... for each address (strtoull, any base), each in a forked
 *                  child: a load, a store, a call; a MAP_FIXED mmap of its
 *                  page then a store; in the parent: write(pipe, ADDR, 8) and
 *                  read(pipe, ADDR, 8) with 8 bytes waiting.  "self" as an
 *                  address means a malloc'd block of the probe's own (the
 *                  control: that one works).  Expected outside guest RAM:
 *                  children "killed by signal 11", syscalls "-1 EFAULT".
 *   cpu            privileged and hypervisor instructions, each in a forked
 *                  child (hlt, cli, sti, in, out, rdmsr, wrmsr, mov from cr0,
 *                  mov to cr3, lgdt, lidt, invd, wbinvd, swapgs, vmcall,
 *                  vmmcall, int $0x80, and the controls int3 and ud2).
 *                  Linux at CPL 3: SIGSEGV, except int3 (SIGTRAP), ud2
 *                  (SIGILL), int $0x80 (a 32-bit syscall) and vmcall/vmmcall
 *                  (SIGILL on bare metal; what a hypervisor does varies).
 *   wall TOKEN N   the victim of two VMs side by side: fills N blocks of 64
 *                  KiB and a 64 KiB global with TOKEN repeated, prints
 *                  "wall block <addr> <len>" for each block and
 *                  "wall global <addr> <len>", then "wall ready", reads
 *                  stdin to EOF, checks every byte and prints "wall intact
 *                  <bytes>" (exit 0) or "wall changed at <addr>" (exit 1).
 *   smash TOKEN ADDR LEN [ADDR LEN]...
 *                  the attacker: for each range, says whether its own memory
 *                  there holds TOKEN ("peek <addr>: token no"), then mallocs
 *                  blocks of 64 KiB - 256 (one buddy each) until malloc fails,
 *                  filling each with 0xA5, then fills its 64 KiB global and each
 *                  given range (its own memory at the same guest addresses) with 0xA5,
 *                  and prints "smashed <bytes>".  VM only (the ranges must be
 *                  its own guest memory).
 *   -f SUBCOMMAND ARGS...
 *                  forks; the child runs SUBCOMMAND, the parent waits and
 *                  prints "forked child: <how it ended>" (with VM-clone fork
 *                  the child is another VM).
 * Every subcommand ends with "<subcommand>: done <n> attempts" and exits 0,
 * except wall (see above); a bad usage prints usage and exits 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "unifork_hypercalls.h"

#define PROG "escape_probe"
#define BLOCK (64 << 10)
#define PWNED 0x64656e776f70ULL /* "pwned" */

static int attempts;
static int in_vm;
static unsigned char wall_global[BLOCK];
static unsigned char *volatile smash_keep;

/* Not guest_common.h's say(): a printf-style line; _exit(3) if stdout fails, native runs too. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;
	const char *p = buf;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	while (n > 0) {
		ssize_t w = write(1, p, (size_t)n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			_exit(3);
		}
		p += w;
		n -= (int)w;
	}
}

/* Not guest_common.h's errname(): every errno the attempts meet, "E<n>" for others. */
static const char *errname(int e)
{
	static char other[16];

	switch (e) {
#define E(x) case x: return #x
	E(EPERM); E(ENOENT); E(ESRCH); E(EINTR); E(EIO); E(ENXIO); E(E2BIG); E(ENOEXEC);
	E(EBADF); E(ECHILD); E(EAGAIN); E(ENOMEM); E(EACCES); E(EFAULT); E(EBUSY); E(EEXIST);
	E(EXDEV); E(ENODEV); E(ENOTDIR); E(EISDIR); E(EINVAL); E(ENFILE); E(EMFILE); E(ENOTTY);
	E(ETXTBSY); E(EFBIG); E(ENOSPC); E(ESPIPE); E(EROFS); E(EMLINK); E(EPIPE); E(ERANGE);
	E(ENAMETOOLONG); E(ENOSYS); E(ENOTEMPTY); E(ELOOP); E(ENOTSOCK); E(EAFNOSUPPORT);
	E(EADDRNOTAVAIL); E(ECONNREFUSED); E(ENETUNREACH); E(EPROTONOSUPPORT); E(EOPNOTSUPP);
	E(ETIMEDOUT); E(EADDRINUSE); E(EDESTADDRREQ); E(EISCONN); E(ENOTCONN); E(EPROTOTYPE);
	E(ENODATA); E(ESTALE); E(ESOCKTNOSUPPORT);
#undef E
	default:
		snprintf(other, sizeof other, "E%d", e);
		return other;
	}
}

/* "<what> = <r>" or "<what> = -1 <ERRNO>"; returns r. */
static long result(const char *what, long r)
{
	int e = errno;

	attempts++;
	if (r < 0)
		say("%s = %ld %s", what, r, errname(e));
	else
		say("%s = %ld", what, r);
	return r;
}

static void skipped(const char *what)
{
	attempts++;
	say("%s = skipped natively", what);
}

/* Not guest_common.h's describe_status(): tests match "killed by signal <n>". */
static const char *describe(int st)
{
	static char buf[64];

	if (WIFEXITED(st))
		snprintf(buf, sizeof buf, "exited %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, sizeof buf, "killed by signal %d", WTERMSIG(st));
	else
		snprintf(buf, sizeof buf, "status 0x%x", st);
	return buf;
}

/* Not guest_common.h's die(): the reason goes to stdout, in line with the attempts. */
static __attribute__((noreturn)) void die(const char *what)
{
	say(PROG ": %s: %s", what, strerror(errno));
	_exit(1);
}

static int reap(pid_t pid)
{
	int st;

	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			die("waitpid");
	return st;
}

/* Run fn(arg) in a forked child that then exits 0; print how the child ended. */
static void in_child(const char *what, void (*fn)(uintptr_t), uintptr_t arg)
{
	pid_t pid = fork();

	if (pid < 0)
		die("fork");
	if (pid == 0) {
		fn(arg);
		_exit(0);
	}
	attempts++;
	say("%s: %s", what, describe(reap(pid)));
}

/* -- files ----------------------------------------------------------------------------- */
static char dirbuf[4096];

static const char *in_dir(const char *name)
{
	static char paths[8][4200];
	static int next;
	char *p = paths[next++ % 8];

	snprintf(p, 4200, "%s/%s", dirbuf, name);
	return p;
}

/* Print what an open() got; show the first bytes of a regular file, write to a writable one. */
static void opened(const char *what, long fd, int write_it)
{
	struct stat st;
	char buf[65];
	char text[200];
	size_t t = 0;

	result(what, fd);
	if (fd < 0)
		return;
	if (write_it) {
		result("  write(fd, \"pwned\", 5)", write((int)fd, "pwned", 5));
	} else if (fstat((int)fd, &st) == 0 && S_ISREG(st.st_mode)) {
		ssize_t n = read((int)fd, buf, 64);
		for (ssize_t i = 0; i < n && t < sizeof text - 5; i++) {
			unsigned char c = (unsigned char)buf[i];
			if (c >= 32 && c < 127 && c != '\\')
				text[t++] = (char)c;
			else
				t += (size_t)snprintf(text + t, 5, "\\x%02x", c);
		}
		text[t] = 0;
		say("  read %ld: %s", (long)n, text);
	}
	close((int)fd);
}

static void try_open(const char *path, int flags)
{
	char what[4300];

	if (strlen(path) > 100)
		snprintf(what, sizeof what, "open(<%zu-byte path ending %s>, %#o)", strlen(path),
			 path + strlen(path) - 10, flags);
	else
		snprintf(what, sizeof what, "open(%s, %#o)", path, flags);
	opened(what, syscall(SYS_open, path, flags, 0644), (flags & O_ACCMODE) != O_RDONLY);
}

static void try_path(const char *name, long r, const char *path)
{
	char what[4300];

	snprintf(what, sizeof what, "%s(%s)", name, path);
	result(what, r);
}

static int files(int argc, char **argv)
{
	static char longpath[5000], maxpath[4096];
	struct stat st;
	char link[256], cwd[256];
	int devnull;

	if (argc != 1)
		return -1;
	snprintf(dirbuf, sizeof dirbuf, "%s", argv[0]);

	/* reading the host */
	static const char *const host[] = {
		"/etc/passwd", "/etc/hostname", "/etc/shadow", "/proc/self/exe",
		"/proc/1/environ", "/proc/self/root/etc/passwd", "/sys/kernel/notes",
		"etc/passwd", "../../../../../../../../etc/passwd", "/dev/../etc/passwd",
		"/dev/./../etc/passwd", "/dev/null/../../etc/passwd", "//etc//passwd",
		"/dev/sda", "/dev/mem", "/dev/kmsg", "/dev/vda",
	};
	for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
		try_open(host[i], O_RDONLY);
	try_open("/proc/self/mem", O_RDWR);
	try_open("/root", O_RDONLY | O_DIRECTORY);
	try_open("/", O_RDONLY | O_DIRECTORY);
	/* the kernel sees "/dev/null" */
	opened("open(/dev/null\\0/../etc/passwd, 0)",
	       syscall(SYS_open, "/dev/null\0/../etc/passwd", O_RDONLY), 0);
	memset(longpath, '/', sizeof longpath - 1);
	strcpy(longpath + sizeof longpath - 11, "etc/passwd"); /* 4999 bytes: too long */
	try_open(longpath, O_RDONLY);
	memset(maxpath, '/', sizeof maxpath - 1);
	strcpy(maxpath + sizeof maxpath - 11, "etc/passwd"); /* 4095 bytes: the longest allowed */
	try_open(maxpath, O_RDONLY);
	try_open(in_dir("secret"), O_RDONLY);
	opened("openat(AT_FDCWD, /etc/passwd)", syscall(SYS_openat, AT_FDCWD, "/etc/passwd", O_RDONLY), 0);
	devnull = open("/dev/null", O_RDONLY);
	opened("openat(<fd of /dev/null>, ../etc/passwd)",
	       syscall(SYS_openat, devnull, "../etc/passwd", O_RDONLY), 0);
	close(devnull);
	opened("openat(-1, etc/passwd)", syscall(SYS_openat, -1, "etc/passwd", O_RDONLY), 0);
	try_path("stat", syscall(SYS_stat, "/etc/passwd", &st), "/etc/passwd");
	try_path("lstat", syscall(SYS_lstat, "/etc/passwd", &st), "/etc/passwd");
	try_path("stat", syscall(SYS_stat, in_dir("secret"), &st), in_dir("secret"));
	try_path("newfstatat", syscall(SYS_newfstatat, AT_FDCWD, "/proc/self/exe", &st, 0),
		 "/proc/self/exe");
	try_path("access", syscall(SYS_access, "/etc/passwd", F_OK), "/etc/passwd");
	try_path("faccessat", syscall(SYS_faccessat, AT_FDCWD, in_dir("secret"), R_OK),
		 in_dir("secret"));
	try_path("readlink", syscall(SYS_readlink, "/proc/self/exe", link, sizeof link), "/proc/self/exe");
	try_path("readlink", syscall(SYS_readlink, "/proc/self/cwd", link, sizeof link), "/proc/self/cwd");
	try_path("statfs", syscall(SYS_statfs, "/", link), "/");
	{
		/* struct file_handle with room for any handle */
		struct { unsigned int bytes; int type; unsigned char h[128]; } fh = {128, 0, {0}};
		int mnt;
		try_path("name_to_handle_at",
			 syscall(SYS_name_to_handle_at, AT_FDCWD, "/etc/passwd", &fh, &mnt, 0),
			 "/etc/passwd");
		opened("open_by_handle_at(AT_FDCWD, <handle of /etc/passwd>)",
		       syscall(SYS_open_by_handle_at, AT_FDCWD, &fh, O_RDONLY), 0);
	}
	if (getcwd(cwd, sizeof cwd))
		say("getcwd = %s", cwd);
	else
		result("getcwd", -1);

	/* changing the host: only ever under DIR */
	try_open(in_dir("created"), O_CREAT | O_WRONLY | O_TRUNC);
	opened("creat(DIR/created2)", syscall(SYS_creat, in_dir("created2"), 0644), 1);
	opened("openat(AT_FDCWD, DIR/created3, O_CREAT|O_EXCL|O_RDWR)",
	       syscall(SYS_openat, AT_FDCWD, in_dir("created3"), O_CREAT | O_EXCL | O_RDWR, 0644), 1);
	try_open(in_dir("secret"), O_WRONLY | O_APPEND);
	try_open(in_dir("victim"), O_WRONLY | O_TRUNC);
	try_path("truncate", syscall(SYS_truncate, in_dir("victim"), 0), "DIR/victim");
	try_path("mkdir", syscall(SYS_mkdir, in_dir("newdir"), 0755), "DIR/newdir");
	try_path("mkdirat", syscall(SYS_mkdirat, AT_FDCWD, in_dir("newdir2"), 0755), "DIR/newdir2");
	try_path("rmdir", syscall(SYS_rmdir, in_dir("subdir")), "DIR/subdir");
	try_path("unlink", syscall(SYS_unlink, in_dir("victim")), "DIR/victim");
	try_path("unlinkat", syscall(SYS_unlinkat, AT_FDCWD, in_dir("secret"), 0), "DIR/secret");
	try_path("rename", syscall(SYS_rename, in_dir("moveme"), in_dir("moved")), "DIR/moveme, DIR/moved");
	try_path("renameat2", syscall(SYS_renameat2, AT_FDCWD, in_dir("moveme"), AT_FDCWD,
				      in_dir("moved2"), 0), "DIR/moveme, DIR/moved2");
	try_path("link", syscall(SYS_link, in_dir("secret"), in_dir("hardlink")), "DIR/secret, DIR/hardlink");
	try_path("symlink", syscall(SYS_symlink, "/etc/passwd", in_dir("symlink")), "/etc/passwd, DIR/symlink");
	try_path("chmod", syscall(SYS_chmod, in_dir("secret"), 0777), "DIR/secret, 0777");
	try_path("fchmodat", syscall(SYS_fchmodat, AT_FDCWD, in_dir("secret"), 0777), "DIR/secret, 0777");
	try_path("chown", syscall(SYS_chown, in_dir("secret"), 1234, 1234), "DIR/secret, 1234, 1234");
	try_path("mknod", syscall(SYS_mknod, in_dir("fifo"), S_IFIFO | 0600, 0), "DIR/fifo, S_IFIFO");
	try_path("utimensat", syscall(SYS_utimensat, AT_FDCWD, in_dir("secret"), NULL, 0), "DIR/secret");
	try_path("setxattr", syscall(SYS_setxattr, in_dir("secret"), "user.pwned", "1", 1, 0),
		 "DIR/secret, user.pwned");
	try_path("chdir", syscall(SYS_chdir, dirbuf), "DIR");
	try_open("secret", O_RDONLY);
	try_open("created4", O_CREAT | O_WRONLY);
	if (in_vm) {
		try_path("chroot", syscall(SYS_chroot, dirbuf), "DIR");
		try_path("mount", syscall(SYS_mount, "none", in_dir("subdir"), "tmpfs", 0L, NULL),
			 "none, DIR/subdir, tmpfs");
		try_path("umount2", syscall(SYS_umount2, "/", 2L /* MNT_DETACH */), "/, MNT_DETACH");
		try_path("pivot_root", syscall(SYS_pivot_root, dirbuf, in_dir("subdir")), "DIR, DIR/subdir");
		try_path("acct", syscall(SYS_acct, in_dir("acct")), "DIR/acct");
	} else {
		skipped("chroot(DIR)");
		skipped("mount(none, DIR/subdir, tmpfs)");
		skipped("umount2(/, MNT_DETACH)");
		skipped("pivot_root(DIR, DIR/subdir)");
		skipped("acct(DIR/acct)");
	}
	return 0;
}

/* -- paths of the VM's own devices, as Linux resolves them ------------------------------ */
static int paths(int argc, char **argv)
{
	static const char *const names[] = {
		"/dev/null", "dev/null", "//dev//null", "/dev/./null", "/dev/../dev/null",
		"/../../dev/null", "./dev/zero", "/dev/null/", "/dev/null/..",
		"/dev/null/../../etc/passwd", "/dev/zero/x", "/dev/nul", "",
	};
	struct stat st;
	int fd;

	(void)argv;
	if (argc != 0)
		return -1;
	if (chdir("/") != 0 && errno != ENOSYS) /* the VM's cwd is always / */
		die("chdir");
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
		try_open(names[i], O_RDONLY);
		try_path("stat", syscall(SYS_stat, names[i], &st), names[i]);
		try_path("access", syscall(SYS_access, names[i], F_OK), names[i]);
	}
	try_open("/dev/null", O_WRONLY | O_CREAT | O_EXCL);
	try_open("/dev/null", O_RDONLY | O_DIRECTORY);
	fd = open("/dev/null", O_RDONLY);
	opened("openat(<fd of /dev/null>, ../dev/null)", syscall(SYS_openat, fd, "../dev/null", O_RDONLY), 0);
	opened("openat(<fd of /dev/null>, /dev/zero)", syscall(SYS_openat, fd, "/dev/zero", O_RDONLY), 0);
	try_path("faccessat(<fd of /dev/null>)", syscall(SYS_faccessat, fd, "null", F_OK), "null");
	close(fd);
	opened("openat(-1, dev/null)", syscall(SYS_openat, -1, "dev/null", O_RDONLY), 0);
	opened("openat(-1, /dev/null)", syscall(SYS_openat, -1, "/dev/null", O_RDONLY), 0);
	opened("openat(1000, dev/null)", syscall(SYS_openat, 1000, "dev/null", O_RDONLY), 0);
	return 0;
}

/* -- sockets --------------------------------------------------------------------------- */
static struct sockaddr_in inet4(int port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static void sock_then(const char *what, long fd, const char *then_what, const struct sockaddr *to,
		      socklen_t len, int send)
{
	if (result(what, fd) < 0)
		return;
	if (send)
		result(then_what, sendto((int)fd, "pwned", 5, 0, to, len));
	else if (to)
		result(then_what, connect((int)fd, to, len));
	close((int)fd);
}

static int sockets(int argc, char **argv)
{
	struct sockaddr_in tcp, udp, any;
	struct sockaddr_in6 tcp6;
	struct sockaddr_un un;
	int sv[2];
	long fd;

	if (argc != 3)
		return -1;
	tcp = inet4(atoi(argv[0]));
	udp = inet4(atoi(argv[2]));
	any = inet4(0);
	any.sin_addr.s_addr = htonl(INADDR_ANY);
	memset(&tcp6, 0, sizeof tcp6);
	tcp6.sin6_family = AF_INET6;
	tcp6.sin6_port = htons((uint16_t)atoi(argv[0]));
	tcp6.sin6_addr.s6_addr[10] = tcp6.sin6_addr.s6_addr[11] = 0xff; /* ::ffff:127.0.0.1 */
	tcp6.sin6_addr.s6_addr[12] = 127;
	tcp6.sin6_addr.s6_addr[15] = 1;
	memset(&un, 0, sizeof un);
	un.sun_family = AF_UNIX;
	snprintf(un.sun_path, sizeof un.sun_path, "%s", argv[1]);

	sock_then("socket(AF_INET, SOCK_STREAM)", socket(AF_INET, SOCK_STREAM, 0),
		  "  connect(127.0.0.1:TCPPORT)", (struct sockaddr *)&tcp, sizeof tcp, 0);
	sock_then("socket(AF_INET6, SOCK_STREAM)", socket(AF_INET6, SOCK_STREAM, 0),
		  "  connect([::ffff:127.0.0.1]:TCPPORT)", (struct sockaddr *)&tcp6, sizeof tcp6, 0);
	sock_then("socket(AF_UNIX, SOCK_STREAM)", socket(AF_UNIX, SOCK_STREAM, 0),
		  "  connect(UNIXPATH)", (struct sockaddr *)&un, sizeof un, 0);
	sock_then("socket(AF_INET, SOCK_DGRAM)", socket(AF_INET, SOCK_DGRAM, 0),
		  "  sendto(127.0.0.1:UDPPORT)", (struct sockaddr *)&udp, sizeof udp, 1);
	sock_then("socket(AF_UNIX, SOCK_DGRAM)", socket(AF_UNIX, SOCK_DGRAM, 0),
		  "  sendto(UNIXPATH)", (struct sockaddr *)&un, sizeof un, 1);
	fd = result("socket(AF_INET, SOCK_STREAM) to listen", socket(AF_INET, SOCK_STREAM, 0));
	if (fd >= 0) {
		result("  bind(0.0.0.0:0)", bind((int)fd, (struct sockaddr *)&any, sizeof any));
		result("  listen", listen((int)fd, 1));
		close((int)fd);
	}
	sock_then("socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)", socket(AF_NETLINK, SOCK_RAW, 0),
		  "", NULL, 0, 0);
	sock_then("socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)", socket(AF_PACKET, SOCK_RAW, htons(3)),
		  "", NULL, 0, 0);
	sock_then("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP),
		  "", NULL, 0, 0);
	if (result("socketpair(AF_UNIX, SOCK_STREAM)", socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) == 0) {
		close(sv[0]);
		close(sv[1]);
	}
	result("connect(1, 127.0.0.1:TCPPORT)", connect(1, (struct sockaddr *)&tcp, sizeof tcp));
	result("sendto(1, 127.0.0.1:UDPPORT)",
	       sendto(1, "pwned", 5, 0, (struct sockaddr *)&udp, sizeof udp));
	return 0;
}

/* -- processes ------------------------------------------------------------------------- */
static int procs(int argc, char **argv)
{
	char cmd[4200], what[128];
	long hostpid, buf = 0;
	int p[2];
	pid_t child;
	char c;

	if (argc != 2)
		return -1;
	if (!in_vm) {
		say(PROG ": procs is VM only (natively it would signal the host's processes)");
		return -1;
	}
	hostpid = atol(argv[0]);
	snprintf(cmd, sizeof cmd, "echo pwned > %s", argv[1]);
	{
		char *const sh_argv[] = {"/bin/sh", "-c", cmd, NULL};
		char *const env[] = {NULL};
		result("execve(/bin/sh -c 'echo pwned > MARKER')", syscall(SYS_execve, "/bin/sh", sh_argv, env));
		result("execve(/proc/self/exe)", syscall(SYS_execve, "/proc/self/exe", sh_argv, env));
		result("execveat(AT_FDCWD, /bin/sh)",
		       syscall(SYS_execveat, AT_FDCWD, "/bin/sh", sh_argv, env, 0));
	}
	result("ptrace(PTRACE_TRACEME)", syscall(SYS_ptrace, 0L, 0L, 0L, 0L));
	result("ptrace(PTRACE_ATTACH, HOSTPID)", syscall(SYS_ptrace, 16L, hostpid, 0L, 0L));
	result("ptrace(PTRACE_SEIZE, 1)", syscall(SYS_ptrace, 0x4206L, 1L, 0L, 0L));
	{
		struct iovec local = {&buf, sizeof buf}, remote = {(void *)0x400000, sizeof buf};
		result("process_vm_readv(HOSTPID)",
		       syscall(SYS_process_vm_readv, hostpid, &local, 1L, &remote, 1L, 0L));
		result("process_vm_writev(HOSTPID)",
		       syscall(SYS_process_vm_writev, hostpid, &local, 1L, &remote, 1L, 0L));
	}
	result("kill(HOSTPID, 0)", kill((pid_t)hostpid, 0));
	result("kill(HOSTPID, SIGKILL)", kill((pid_t)hostpid, SIGKILL));
	result("kill(-HOSTPID, SIGKILL)", kill((pid_t)-hostpid, SIGKILL));
	result("tkill(HOSTPID, SIGKILL)", syscall(SYS_tkill, hostpid, (long)SIGKILL));
	result("tgkill(HOSTPID, HOSTPID, SIGKILL)", syscall(SYS_tgkill, hostpid, hostpid, (long)SIGKILL));
	result("pidfd_open(HOSTPID)", syscall(SYS_pidfd_open, hostpid, 0L));
	result("pidfd_send_signal(0, SIGKILL)", syscall(SYS_pidfd_send_signal, 0L, (long)SIGKILL, 0L, 0L));
	result("kill(1, SIGKILL)", kill(1, SIGKILL));
	result("kill(1, SIGTERM)", kill(1, SIGTERM));
	result("kill(1, 0)", kill(1, 0));
	result("unshare(CLONE_NEWUSER|CLONE_NEWNS)", syscall(SYS_unshare, 0x10020000L));
	result("setns(0, 0)", syscall(SYS_setns, 0L, 0L));
	result("sethostname(pwned)", syscall(SYS_sethostname, "pwned", 5L));
	result("setdomainname(pwned)", syscall(SYS_setdomainname, "pwned", 5L));
	{
		struct timespec ts = {1, 0};
		result("clock_settime(CLOCK_REALTIME, 1)", syscall(SYS_clock_settime, 0L, &ts));
		result("settimeofday(1)", syscall(SYS_settimeofday, &ts, NULL));
	}
	result("reboot(POWER_OFF)", syscall(SYS_reboot, 0xfee1deadL, 672274793L, 0x4321fedcL, NULL));
	result("init_module", syscall(SYS_init_module, "", 0L, ""));
	result("kexec_load", syscall(SYS_kexec_load, 0L, 0L, NULL, 0L));
	result("iopl(3)", syscall(SYS_iopl, 3L));
	result("ioperm(0x3f8, 8, 1)", syscall(SYS_ioperm, 0x3f8L, 8L, 1L));
	result("io_uring_setup(8)", syscall(SYS_io_uring_setup, 8L, &buf));
	result("bpf(BPF_PROG_LOAD)", syscall(SYS_bpf, 5L, &buf, 8L));
	result("perf_event_open", syscall(SYS_perf_event_open, &buf, 0L, -1L, -1L, 0L));
	result("userfaultfd", syscall(SYS_userfaultfd, 0L));
	result("swapoff(/)", syscall(SYS_swapoff, "/"));
	result("setuid(1000)", syscall(SYS_setuid, 1000L));

	/* last: kill(-1, SIGKILL), with a child of ours waiting on a pipe */
	if (pipe(p) != 0)
		die("pipe");
	child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		close(p[1]);
		while (read(p[0], &c, 1) < 0 && errno == EINTR)
			;
		_exit(0);
	}
	close(p[0]);
	result("kill(-1, SIGKILL)", kill(-1, SIGKILL));
	attempts++;
	snprintf(what, sizeof what, "child after kill(-1): %s", describe(reap(child)));
	say("%s", what);
	say("still alive");
	close(p[1]);
	return 0;
}

/* -- memory ---------------------------------------------------------------------------- */
static void do_load(uintptr_t a)
{
	volatile uint64_t v = *(volatile uint64_t *)a;
	(void)v;
}

static void do_store(uintptr_t a)
{
	*(volatile uint64_t *)a = PWNED;
}

static void do_call(uintptr_t a)
{
	((void (*)(void))a)();
}

static void do_mmap_fixed(uintptr_t a)
{
	uintptr_t page = a & ~(uintptr_t)4095;
	void *m = mmap((void *)page, 4096, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
		       -1, 0);

	if (m == MAP_FAILED) {
		say("  mmap(%#lx, MAP_FIXED) = -1 %s", (unsigned long)page, errname(errno));
		return;
	}
	say("  mmap(%#lx, MAP_FIXED) = %#lx", (unsigned long)page, (unsigned long)(uintptr_t)m);
	*(volatile uint64_t *)a = PWNED;
}

static int memory(int argc, char **argv)
{
	char what[128], buf[8];
	int p[2];
	void *mine = malloc(4096);

	if (argc < 1 || !mine)
		return -1;
	memset(mine, 0x5a, 4096);
	if (pipe(p) != 0)
		die("pipe");
	for (int i = 0; i < argc; i++) {
		uintptr_t a = strcmp(argv[i], "self") == 0 ? (uintptr_t)mine
							  : (uintptr_t)strtoull(argv[i], NULL, 0);
		const char *name = strcmp(argv[i], "self") == 0 ? "self" : argv[i];

		snprintf(what, sizeof what, "load %s", name);
		in_child(what, do_load, a);
		snprintf(what, sizeof what, "store %s", name);
		in_child(what, do_store, a);
		snprintf(what, sizeof what, "call %s", name);
		in_child(what, do_call, strcmp(name, "self") == 0 ? 0 : a); /* never call our own data */
		snprintf(what, sizeof what, "mmap_fixed+store %s", name);
		if (strcmp(name, "self") == 0 || !in_vm) {
			skipped(what); /* MAP_FIXED over our own heap or a native mapping: nothing to learn */
		} else {
			in_child(what, do_mmap_fixed, a);
		}
		snprintf(what, sizeof what, "write(pipe, %s, 8)", name);
		result(what, syscall(SYS_write, p[1], a, 8L));
		if (write(p[1], "12345678", 8) != 8)
			die("write");
		snprintf(what, sizeof what, "read(pipe, %s, 8)", name);
		result(what, syscall(SYS_read, p[0], a, 8L));
		/* drain: 8 bytes if the read failed, 8 more if the write succeeded */
		{
			int fl = fcntl(p[0], F_GETFL);
			fcntl(p[0], F_SETFL, fl | O_NONBLOCK);
			while (read(p[0], buf, sizeof buf) > 0)
				;
			fcntl(p[0], F_SETFL, fl);
		}
	}
	for (int i = 0; i < 4096; i++)
		if (((unsigned char *)mine)[i] != 0x5a) {
			say("own block changed at %d", i);
			return 1;
		}
	return 0;
}

/* -- cpu ------------------------------------------------------------------------------- */
static void i_hlt(uintptr_t a) { (void)a; __asm__ volatile("hlt"); }
static void i_cli(uintptr_t a) { (void)a; __asm__ volatile("cli"); }
static void i_sti(uintptr_t a) { (void)a; __asm__ volatile("sti"); }
static void i_in(uintptr_t a)
{
	unsigned char v;
	(void)a;
	__asm__ volatile("inb %%dx, %%al" : "=a"(v) : "d"(0x3f8));
}
static void i_out(uintptr_t a) { (void)a; __asm__ volatile("outb %%al, %%dx" : : "a"(0x41), "d"(0x3f8)); }
static void i_rdmsr(uintptr_t a)
{
	unsigned lo, hi;
	(void)a;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xC0000100));
}
static void i_wrmsr(uintptr_t a) { (void)a; __asm__ volatile("wrmsr" : : "a"(0), "d"(0), "c"(0xC0000080)); }
static void i_rdcr0(uintptr_t a)
{
	unsigned long v;
	(void)a;
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
}
static void i_wrcr3(uintptr_t a) { (void)a; __asm__ volatile("mov %0, %%cr3" : : "r"(0UL)); }
static void i_lgdt(uintptr_t a)
{
	static const unsigned char gdtr[10] = {0};
	(void)a;
	__asm__ volatile("lgdt %0" : : "m"(gdtr));
}
static void i_lidt(uintptr_t a)
{
	static const unsigned char idtr[10] = {0};
	(void)a;
	__asm__ volatile("lidt %0" : : "m"(idtr));
}
static void i_invd(uintptr_t a) { (void)a; __asm__ volatile("invd"); }
static void i_wbinvd(uintptr_t a) { (void)a; __asm__ volatile("wbinvd"); }
static void i_swapgs(uintptr_t a) { (void)a; __asm__ volatile("swapgs"); }
static void i_vmcall(uintptr_t a) { (void)a; __asm__ volatile("vmcall" : : "a"(0UL) : "memory"); }
static void i_vmmcall(uintptr_t a) { (void)a; __asm__ volatile("vmmcall" : : "a"(0UL) : "memory"); }
static void i_int80(uintptr_t a)
{
	long r;
	(void)a;
	/* 32-bit getpid (20) through the ia32 gate */
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(20L) : "memory");
}
static void i_int3(uintptr_t a) { (void)a; __asm__ volatile("int3"); }
static void i_ud2(uintptr_t a) { (void)a; __asm__ volatile("ud2"); }

static int cpu(int argc, char **argv)
{
	static const struct {
		const char *name;
		void (*fn)(uintptr_t);
	} insns[] = {
		{"hlt", i_hlt}, {"cli", i_cli}, {"sti", i_sti}, {"in", i_in}, {"out", i_out},
		{"rdmsr", i_rdmsr}, {"wrmsr", i_wrmsr}, {"mov cr0", i_rdcr0}, {"mov cr3", i_wrcr3},
		{"lgdt", i_lgdt}, {"lidt", i_lidt}, {"invd", i_invd}, {"wbinvd", i_wbinvd},
		{"swapgs", i_swapgs}, {"vmcall", i_vmcall}, {"vmmcall", i_vmmcall},
		{"int 0x80", i_int80}, {"int3", i_int3}, {"ud2", i_ud2},
	};

	(void)argv;
	if (argc != 0)
		return -1;
	for (size_t i = 0; i < sizeof insns / sizeof insns[0]; i++)
		in_child(insns[i].name, insns[i].fn, 0);
	return 0;
}

/* -- two VMs side by side -------------------------------------------------------------- */
static void fill_token(unsigned char *p, size_t n, const char *token)
{
	size_t t = strlen(token);

	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)token[i % t];
}

static int wall(int argc, char **argv)
{
	unsigned char *blocks[64];
	char c;
	int n;
	long total = 0;

	if (argc != 2 || (n = atoi(argv[1])) < 1 || n > 64 || !*argv[0])
		return -1;
	for (int i = 0; i < n; i++) {
		blocks[i] = malloc(BLOCK);
		if (!blocks[i])
			die("malloc");
		fill_token(blocks[i], BLOCK, argv[0]);
		say("wall block %#lx %d", (unsigned long)(uintptr_t)blocks[i], BLOCK);
	}
	fill_token(wall_global, BLOCK, argv[0]);
	say("wall global %#lx %d", (unsigned long)(uintptr_t)wall_global, BLOCK);
	say("wall ready");
	while (read(0, &c, 1) > 0)
		;
	for (int i = 0; i <= n; i++) {
		unsigned char *b = i < n ? blocks[i] : wall_global;
		size_t t = strlen(argv[0]);
		for (size_t j = 0; j < BLOCK; j++)
			if (b[j] != (unsigned char)argv[0][j % t]) {
				say("wall changed at %#lx", (unsigned long)(uintptr_t)(b + j));
				return 1;
			}
		total += BLOCK;
	}
	say("wall intact %ld", total);
	attempts++;
	return 0;
}

static int smash(int argc, char **argv)
{
	long total = 0;
	size_t t;

	if (argc < 3 || argc % 2 == 0)
		return -1;
	if (!in_vm) {
		say(PROG ": smash is VM only (the ranges must be guest memory)");
		return -1;
	}
	t = strlen(argv[0]);
	for (int i = 1; i < argc; i += 2) {
		unsigned char *p = (unsigned char *)(uintptr_t)strtoull(argv[i], NULL, 0);
		size_t len = strtoull(argv[i + 1], NULL, 0);
		int same = len >= t && memcmp(p, argv[0], t) == 0;
		for (size_t j = t; same && j + t <= len; j += t)
			same = memcmp(p + j, argv[0], t) == 0;
		attempts++;
		say("peek %#lx: token %s", (unsigned long)(uintptr_t)p, same ? "yes" : "no");
	}
	for (;;) {
		/* a little under 64 KiB: the block and its header fit one 64 KiB buddy */
		unsigned char *b = malloc(BLOCK - 256);
		if (!b)
			break;
		memset(b, 0xa5, BLOCK - 256);
		total += BLOCK - 256;
		smash_keep = b; /* used: the compiler may not elide the malloc */
	}
	memset(wall_global, 0xa5, BLOCK);
	total += BLOCK;
	for (int i = 1; i < argc; i += 2) {
		unsigned char *p = (unsigned char *)(uintptr_t)strtoull(argv[i], NULL, 0);
		size_t len = strtoull(argv[i + 1], NULL, 0);
		memset(p, 0xa5, len);
		total += (long)len;
		attempts++;
	}
	say("smashed %ld", total);
	return 0;
}

/* -- main ------------------------------------------------------------------------------ */
static int usage(void)
{
	static const char text[] =
		"usage: " PROG " [-f] files DIR\n"
		"       " PROG " [-f] paths\n"
		"       " PROG " [-f] sockets TCPPORT UNIXPATH UDPPORT\n"
		"       " PROG " [-f] procs HOSTPID MARKER     (VM only)\n"
		"       " PROG " [-f] memory ADDR|self...\n"
		"       " PROG " [-f] cpu\n"
		"       " PROG " wall TOKEN N\n"
		"       " PROG " smash TOKEN ADDR LEN [ADDR LEN]...   (VM only)\n";
	if (write(2, text, sizeof text - 1) < 0)
		return 2;
	return 2;
}

static int run(const char *cmd, int argc, char **argv)
{
	int r;

	if (strcmp(cmd, "files") == 0)
		r = files(argc, argv);
	else if (strcmp(cmd, "sockets") == 0)
		r = sockets(argc, argv);
	else if (strcmp(cmd, "paths") == 0)
		r = paths(argc, argv);
	else if (strcmp(cmd, "procs") == 0)
		r = procs(argc, argv);
	else if (strcmp(cmd, "memory") == 0)
		r = memory(argc, argv);
	else if (strcmp(cmd, "cpu") == 0)
		r = cpu(argc, argv);
	else if (strcmp(cmd, "wall") == 0) {
		r = wall(argc, argv);
		return r < 0 ? usage() : r;
	}
	else if (strcmp(cmd, "smash") == 0)
		r = smash(argc, argv);
	else
		r = -1;
	if (r < 0)
		return usage();
	say("%s: done %d attempts", cmd, attempts);
	return r;
}

int main(int argc, char **argv)
{
	in_vm = unifork_in_vm();
	if (argc >= 3 && strcmp(argv[1], "-f") == 0) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0)
			_exit(run(argv[2], argc - 3, argv + 3));
		say("forked child: %s", describe(reap(pid)));
		return 0;
	}
	if (argc < 2)
		return usage();
	return run(argv[1], argc - 2, argv + 2);
}
