/*
 * fs_ops.c — the file system syscalls of issue 14, each with its result.
 *
 * usage: fs_ops DIR [noowner]
 *                     (DIR must not exist; its parent must: /tmp in a VM, a tmpfs
 *                      directory natively).  Prints one line per check, nothing
 *                      that depends on where DIR is, inode numbers or times, so
 *                      the output is the same natively and in every fork mode.
 *                      "noowner" leaves out the chown checks (natively they need
 *                      root, which the guest always is).
 */
#define PROG "fs_ops"
#define _GNU_SOURCE
#include "guest_common.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>

static const char *ename(int e)
{
	static const struct { int e; const char *n; } names[] = {
		{ENOENT, "ENOENT"}, {ENOTDIR, "ENOTDIR"}, {EISDIR, "EISDIR"}, {EEXIST, "EEXIST"},
		{ENOTEMPTY, "ENOTEMPTY"}, {ELOOP, "ELOOP"}, {ENAMETOOLONG, "ENAMETOOLONG"},
		{EACCES, "EACCES"}, {EINVAL, "EINVAL"}, {EBADF, "EBADF"}, {EPERM, "EPERM"},
		{ESPIPE, "ESPIPE"}, {EXDEV, "EXDEV"}, {ERANGE, "ERANGE"}, {ENOSPC, "ENOSPC"},
		{EAGAIN, "EAGAIN"},
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (names[i].e == e)
			return names[i].n;
	return "E?";
}

static long R(const char *what, long r)
{
	if (r < 0)
		printf("%s = -1 %s\n", what, ename(errno));
	else
		printf("%s = %ld\n", what, r);
	return r;
}

static void put(const char *name, const char *text)
{
	int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		die("put %s: %s", name, strerror(errno));
	close(fd);
}

static void show(const char *name)
{
	char buf[256];
	int fd = open(name, O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (n < 0) {
		printf("%s: -1 %s\n", name, ename(errno));
	} else {
		buf[n] = 0;
		printf("%s: \"%s\"\n", name, buf);
	}
	if (fd >= 0)
		close(fd);
}

static int cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void list(const char *path)
{
	char *names[64];
	int n = 0;
	DIR *d = opendir(path);
	struct dirent *e;

	if (!d) {
		printf("ls %s: -1 %s\n", path, ename(errno));
		return;
	}
	while ((e = readdir(d)) && n < 64)
		names[n++] = strdup(e->d_name);
	closedir(d);
	qsort(names, n, sizeof names[0], cmp);
	printf("ls %s:", path);
	for (int i = 0; i < n; i++) {
		printf(" %s", names[i]);
		free(names[i]);
	}
	printf("\n");
}

static const char *base(const char *p)
{
	const char *s = strrchr(p, '/');
	return s ? s + 1 : p;
}

static void opens(void)
{
	int fd;
	char name[300];

	printf("-- open\n");
	R("open(nope, O_RDONLY)", open("nope", O_RDONLY));
	fd = R("open(a, O_CREAT|O_EXCL|O_RDWR)", open("a", O_CREAT | O_EXCL | O_RDWR, 0644));
	R("write(a, hello)", write(fd, "hello", 5));
	R("open(a, O_CREAT|O_EXCL)", open("a", O_CREAT | O_EXCL | O_RDWR, 0644));
	R("open(a, O_DIRECTORY)", open("a", O_RDONLY | O_DIRECTORY));
	R("open(a/, O_RDONLY)", open("a/", O_RDONLY));
	R("open(a/x, O_RDONLY)", open("a/x", O_RDONLY));
	R("open(., O_WRONLY)", open(".", O_WRONLY));
	R("open(newdir/, O_CREAT)", open("newdir/", O_CREAT | O_WRONLY, 0644));
	memset(name, 'n', 256);
	name[256] = 0;
	R("open(<256-byte name>, O_CREAT)", open(name, O_CREAT | O_WRONLY, 0644));
	R("symlink(a, la)", symlink("a", "la"));
	R("open(la, O_NOFOLLOW)", open("la", O_RDONLY | O_NOFOLLOW));
	R("symlink(loop, loop)", symlink("loop", "loop"));
	R("open(loop, O_RDONLY)", open("loop", O_RDONLY));
	R("open(loop, O_CREAT)", open("loop", O_CREAT | O_WRONLY, 0644));
	{
		/* a path of 10,000 components is longer than PATH_MAX; 2,000 "./" fit */
		char *p = malloc(20001);
		for (int i = 0; i < 10000; i++)
			memcpy(p + 2 * i, "./", 2);
		p[20000] = 0;
		R("open(<10,000 components>)", open(p, O_RDONLY));
		strcpy(p + 2 * 2000, "a");
		int lf = open(p, O_RDONLY);
		R("open(<2,000 components>/a)", lf >= 0 ? 0 : -1);
		close(lf);
		free(p);
	}
	int ap = open("a", O_WRONLY | O_APPEND);
	R("write(O_APPEND, !)", write(ap, "!", 1));
	close(ap);
	show("a");
	int tr = open("a", O_WRONLY | O_TRUNC);
	struct stat st;
	fstat(fd, &st);
	printf("after O_TRUNC size=%ld\n", (long)st.st_size);
	close(tr);
	close(fd);
	put("a", "hello");
}

static void rw(void)
{
	char buf[64];
	int fd = open("rw", O_CREAT | O_RDWR | O_TRUNC, 0644);
	struct iovec iov[3] = {{"one ", 4}, {"two ", 4}, {"three", 5}};

	printf("-- read/write\n");
	R("writev(3 iovecs)", writev(fd, iov, 3));
	R("lseek(0, SEEK_CUR)", lseek(fd, 0, SEEK_CUR));
	R("pwrite(TWO, 4)", pwrite(fd, "TWO", 3, 4));
	R("lseek(0, SEEK_CUR) after pwrite", lseek(fd, 0, SEEK_CUR));
	memset(buf, 0, sizeof buf);
	R("pread(5 at 8)", pread(fd, buf, 5, 8));
	printf("pread got \"%s\"\n", buf);
	R("lseek(0, SEEK_SET)", lseek(fd, 0, SEEK_SET));
	char a[4] = {0}, b[32] = {0};
	struct iovec rv[2] = {{a, 3}, {b, sizeof b - 1}};
	R("readv", readv(fd, rv, 2));
	printf("readv got \"%s\" \"%s\"\n", a, b);
	R("read at EOF", read(fd, buf, sizeof buf));
	R("lseek(-2, SEEK_END)", lseek(fd, -2, SEEK_END));
	R("lseek(-100, SEEK_SET)", lseek(fd, -100, SEEK_SET));
	R("lseek(20, SEEK_END)", lseek(fd, 20, SEEK_END));
	R("write past the end", write(fd, "Z", 1));
	struct stat st;
	fstat(fd, &st);
	printf("size with a hole=%ld\n", (long)st.st_size);
	pread(fd, buf, 4, 13);
	printf("hole bytes %d %d %d %d\n", buf[0], buf[1], buf[2], buf[3]);
	R("pread(-1 offset)", pread(fd, buf, 1, -1));
	R("read(O_WRONLY fd)", read(open("rw", O_WRONLY), buf, 1));
	R("write(O_RDONLY fd)", write(open("rw", O_RDONLY), "x", 1));
	R("read(directory)", read(open(".", O_RDONLY | O_DIRECTORY), buf, 1));
	int p[2];
	pipe(p);
	R("lseek(pipe)", lseek(p[0], 0, SEEK_SET));
	R("pread(pipe)", pread(p[0], buf, 1, 0));
	R("fsync(file)", fsync(fd));
	R("fdatasync(file)", fdatasync(fd));
	R("fsync(pipe)", fsync(p[1]));
	close(p[0]);
	close(p[1]);
	R("ftruncate(3)", ftruncate(fd, 3));
	R("truncate(rw, 6)", truncate("rw", 6));
	stat("rw", &st);
	printf("size after truncate=%ld\n", (long)st.st_size);
	R("ftruncate(O_RDONLY fd)", ftruncate(open("rw", O_RDONLY), 1));
	R("truncate(., 1)", truncate(".", 1));
	close(fd);
}

static void stats(void)
{
	struct stat st, st2;
	unsigned char sx[256];

	printf("-- stat\n");
	stat("a", &st);
	printf("stat a: reg=%d mode=%o size=%ld nlink=%ld\n", S_ISREG(st.st_mode),
	       st.st_mode & 07777, (long)st.st_size, (long)st.st_nlink);
	lstat("la", &st2);
	printf("lstat la: lnk=%d size=%ld\n", S_ISLNK(st2.st_mode), (long)st2.st_size);
	stat("la", &st2);
	printf("stat la: same inode as a=%d\n", st.st_ino == st2.st_ino);
	R("stat(nope)", stat("nope", &st2));
	R("stat(a/)", stat("a/", &st2));
	R("lstat(loop)", lstat("loop", &st2));
	R("stat(loop)", stat("loop", &st2));
	R("fstatat(AT_FDCWD, a, AT_SYMLINK_NOFOLLOW)", fstatat(AT_FDCWD, "a", &st2, AT_SYMLINK_NOFOLLOW));
	int fd = open("a", O_RDONLY);
	R("fstatat(fd, \"\", AT_EMPTY_PATH)", fstatat(fd, "", &st2, AT_EMPTY_PATH));
	printf("AT_EMPTY_PATH same inode=%d\n", st.st_ino == st2.st_ino);
	close(fd);
	memset(sx, 0, sizeof sx);
	R("statx(a)", syscall(SYS_statx, AT_FDCWD, "a", 0, 0x7ff, sx));
	uint32_t nlink;
	uint16_t mode;
	uint64_t ino, size;
	memcpy(&nlink, sx + 0x10, 4);
	memcpy(&mode, sx + 0x1c, 2);
	memcpy(&ino, sx + 0x20, 8);
	memcpy(&size, sx + 0x28, 8);
	printf("statx: mode=%o size=%lu nlink=%u same inode=%d\n", mode, (unsigned long)size, nlink,
	       ino == st.st_ino);
	stat(".", &st);
	printf("stat .: dir=%d\n", S_ISDIR(st.st_mode));
	stat("/dev/null", &st);
	printf("stat /dev/null: chr=%d rdev=%u:%u\n", S_ISCHR(st.st_mode),
	       (unsigned)(st.st_rdev >> 8) & 0xfff, (unsigned)(st.st_rdev & 0xff));
	struct statfs sf;
	R("statfs(.)", statfs(".", &sf));
	printf("statfs .: tmpfs=%d bsize=%ld namelen=%ld free<=total=%d\n",
	       sf.f_type == 0x01021994, (long)sf.f_bsize, (long)sf.f_namelen,
	       sf.f_bfree <= sf.f_blocks);
	int fd2 = open("a", O_RDONLY);
	R("fstatfs(a)", fstatfs(fd2, &sf));
	printf("fstatfs a: tmpfs=%d\n", sf.f_type == 0x01021994);
	close(fd2);
	R("statfs(/proc)", statfs("/proc", &sf));
	printf("statfs /proc: proc=%d\n", sf.f_type == 0x9fa0);
	R("statfs(nope)", statfs("nope", &sf));
	R("statfs(a/x)", statfs("a/x", &sf));
}

static void owners(void)
{
	struct stat st;

	printf("-- owners\n");
	put("own", "owned");
	R("chown(own, 1000, 1001)", chown("own", 1000, 1001));
	stat("own", &st);
	printf("uid=%u gid=%u\n", (unsigned)st.st_uid, (unsigned)st.st_gid);
	R("chown(own, -1, 7)", chown("own", -1, 7));
	stat("own", &st);
	printf("uid=%u gid=%u\n", (unsigned)st.st_uid, (unsigned)st.st_gid);
	symlink("own", "lown");
	R("lchown(lown, 5, 5)", lchown("lown", 5, 5));
	lstat("lown", &st);
	printf("link uid=%u, ", (unsigned)st.st_uid);
	stat("lown", &st);
	printf("file uid=%u\n", (unsigned)st.st_uid);
	R("fchownat(lown, 6, 6, AT_SYMLINK_NOFOLLOW)",
	  fchownat(AT_FDCWD, "lown", 6, 6, AT_SYMLINK_NOFOLLOW));
	chmod("own", 06755);
	int fd = open("own", O_RDONLY);
	R("fchown(own, 0, 0)", fchown(fd, 0, 0));
	fstat(fd, &st);
	printf("after chown of a set-id file: uid=%u mode=%o\n", (unsigned)st.st_uid,
	       st.st_mode & 07777);
	close(fd);
	R("chown(nope)", chown("nope", 0, 0));
	unlink("lown");
	unlink("own");
}

static void dirs(void)
{
	char cwd[4096];
	struct stat st;

	printf("-- directories\n");
	R("mkdir(d)", mkdir("d", 0755));
	R("mkdir(d)", mkdir("d", 0755));
	R("mkdir(d/e/f)", mkdir("d/e/f", 0755));
	R("mkdir(a/x)", mkdir("a/x", 0755));
	R("mkdirat(dirfd, e)", mkdirat(open("d", O_RDONLY | O_DIRECTORY), "e", 0755));
	stat("d", &st);
	printf("nlink of d=%ld\n", (long)st.st_nlink);
	put("d/e/f1", "in e");
	list("d");
	list("d/e");
	R("rmdir(d)", rmdir("d"));
	R("rmdir(a)", rmdir("a"));
	R("rmdir(d/e/.)", rmdir("d/e/."));
	R("unlink(d)", unlink("d"));
	R("chdir(d/e)", chdir("d/e"));
	getcwd(cwd, sizeof cwd);
	printf("cwd ends %s\n", base(cwd));
	show("f1");
	show("../../a");
	R("getcwd(buf, 2)", getcwd(cwd, 2) ? 0 : -1);
	R("chdir(f1)", chdir("f1"));
	R("chdir(..)", chdir(".."));
	getcwd(cwd, sizeof cwd);
	printf("cwd ends %s\n", base(cwd));
	int up = open("..", O_RDONLY | O_DIRECTORY);
	R("fchdir(..)", fchdir(up));
	getcwd(cwd, sizeof cwd);
	printf("cwd ends %s (after fchdir)\n", base(cwd));
	int dfd = open("d", O_RDONLY | O_DIRECTORY);
	R("openat(d, e/f1)", openat(dfd, "e/f1", O_RDONLY) >= 0 ? 0 : -1);
	R("openat(file fd, x)", openat(open("a", O_RDONLY), "x", O_RDONLY));
	R("fchdir(file fd)", fchdir(open("a", O_RDONLY)));
	R("unlinkat(d, e/f1, 0)", unlinkat(dfd, "e/f1", 0));
	R("unlinkat(d, e, AT_REMOVEDIR)", unlinkat(dfd, "e", AT_REMOVEDIR));
	R("rmdir(d)", rmdir("d"));
	close(dfd);
	close(up);
}

static void links(void)
{
	char buf[64];
	struct stat st;

	printf("-- links and renames\n");
	R("link(a, b)", link("a", "b"));
	stat("a", &st);
	printf("nlink of a=%ld\n", (long)st.st_nlink);
	R("link(a, b)", link("a", "b"));
	R("link(., dl)", link(".", "dl"));
	R("unlink(b)", unlink("b"));
	R("unlink(b)", unlink("b"));
	ssize_t n = R("readlink(la)", readlink("la", buf, sizeof buf));
	if (n >= 0)
		printf("readlink got \"%.*s\"\n", (int)n, buf);
	R("readlink(la, 1 byte)", readlink("la", buf, 1));
	R("readlink(a)", readlink("a", buf, sizeof buf));
	R("symlinkat(a, AT_FDCWD, lb)", symlinkat("a", AT_FDCWD, "lb"));
	R("readlinkat(AT_FDCWD, lb)", readlinkat(AT_FDCWD, "lb", buf, sizeof buf));
	R("symlink(a, la)", symlink("a", "la"));
	put("c", "cee");
	R("rename(c, a2)", rename("c", "a2"));
	show("a2");
	show("c");
	put("c", "new c");
	R("rename(c, a2) over a file", rename("c", "a2"));
	show("a2");
	mkdir("r", 0755);
	mkdir("r/s", 0755);
	R("rename(r, r/s/t)", rename("r", "r/s/t"));
	R("rename(a2, r)", rename("a2", "r"));
	R("rename(r, a2)", rename("r", "a2"));
	mkdir("q", 0755);
	R("rename(q, r) onto non-empty", rename("q", "r"));
	R("rename(r/s, q) onto empty", rename("r/s", "q"));
	list("r");
	R("renameat(AT_FDCWD, q, AT_FDCWD, q2)", renameat(AT_FDCWD, "q", AT_FDCWD, "q2"));
	R("linkat(AT_FDCWD, la, AT_FDCWD, lc, AT_SYMLINK_FOLLOW)",
	  linkat(AT_FDCWD, "la", AT_FDCWD, "lc", AT_SYMLINK_FOLLOW));
	lstat("lc", &st);
	printf("lc is a regular file=%d\n", S_ISREG(st.st_mode));
	rmdir("q2");
	rmdir("r");
	unlink("lb");
	unlink("lc");
	unlink("a2");
}

static void modes(void)
{
	struct stat st;
	struct timespec ts[2] = {{1000000000, 5}, {1234567890, 123456789}};

	printf("-- modes, access, times\n");
	R("umask(027)", umask(027));
	put("m", "mode");
	stat("m", &st);
	printf("created 0644 under umask 027: %o\n", st.st_mode & 07777);
	R("umask(022)", umask(022));
	R("chmod(m, 0755)", chmod("m", 0755));
	stat("m", &st);
	printf("after chmod: %o\n", st.st_mode & 07777);
	int fd = open("m", O_RDONLY);
	R("fchmod(m, 0600)", fchmod(fd, 0600));
	fstat(fd, &st);
	printf("after fchmod: %o\n", st.st_mode & 07777);
	R("access(m, F_OK)", access("m", F_OK));
	R("access(m, R_OK|W_OK)", access("m", R_OK | W_OK));
	R("access(m, X_OK)", access("m", X_OK));
	R("access(., X_OK)", access(".", X_OK));
	R("access(nope, F_OK)", access("nope", F_OK));
	R("access(m, 8)", access("m", 8));
	R("faccessat(AT_FDCWD, m, X_OK)", faccessat(AT_FDCWD, "m", X_OK, 0));
	chmod("m", 0700);
	R("access(m, X_OK) after chmod 0700", access("m", X_OK));
	R("utimensat(m)", utimensat(AT_FDCWD, "m", ts, 0));
	stat("m", &st);
	printf("atime=%ld.%09ld mtime=%ld.%09ld\n", (long)st.st_atim.tv_sec, st.st_atim.tv_nsec,
	       (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
	struct timespec omit[2] = {{0, UTIME_OMIT}, {7, 0}};
	R("futimens(fd, OMIT, 7)", futimens(fd, omit));
	fstat(fd, &st);
	printf("atime=%ld mtime=%ld\n", (long)st.st_atim.tv_sec, (long)st.st_mtim.tv_sec);
	struct timespec bad[2] = {{0, 1000000000}, {0, 0}};
	R("utimensat(bad nsec)", utimensat(AT_FDCWD, "m", bad, 0));
	close(fd);
	unlink("m");
}

static void fds(void)
{
	printf("-- descriptors\n");
	int fd = open("a", O_RDONLY | O_CLOEXEC);
	R("fcntl(O_CLOEXEC fd, F_GETFD)", fcntl(fd, F_GETFD));
	R("fcntl(F_SETFD, 0)", fcntl(fd, F_SETFD, 0));
	R("fcntl(F_GETFD)", fcntl(fd, F_GETFD));
	int d = fcntl(fd, F_DUPFD_CLOEXEC, 10);
	printf("F_DUPFD_CLOEXEC >= 10: %d\n", d >= 10);
	R("fcntl(dup, F_GETFD)", fcntl(d, F_GETFD));
	int w = open("a", O_WRONLY | O_APPEND);
	R("F_GETFL(O_WRONLY|O_APPEND)", fcntl(w, F_GETFL) & (O_ACCMODE | O_APPEND | O_NONBLOCK));
	R("F_SETFL(O_NONBLOCK)", fcntl(w, F_SETFL, O_NONBLOCK));
	R("F_GETFL after F_SETFL", fcntl(w, F_GETFL) & (O_ACCMODE | O_APPEND | O_NONBLOCK));
	R("F_GETFL has O_LARGEFILE", (fcntl(w, F_GETFL) & 0100000) != 0);
	int e = dup(fd);
	char c;
	read(fd, &c, 1);
	R("dup shares the offset", lseek(e, 0, SEEK_CUR));
	R("dup2(fd, 20)", dup2(fd, 20));
	R("dup2(fd, fd)", dup2(fd, fd));
	R("dup3(fd, fd, 0)", dup3(fd, fd, 0));
	R("dup3(fd, 21, O_CLOEXEC)", dup3(fd, 21, O_CLOEXEC));
	R("fcntl(21, F_GETFD)", fcntl(21, F_GETFD));
	R("dup(99)", dup(99));
	close(fd);
	close(d);
	close(e);
	close(w);
	close(20);
	close(21);
}

static void maps(void)
{
	printf("-- mmap\n");
	put("mp", "mapped file contents");
	int fd = open("mp", O_RDWR);
	char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED) {
		printf("mmap private: -1 %s\n", ename(errno));
	} else {
		printf("private map reads \"%.20s\"\n", p);
		p[0] = 'M';
		munmap(p, 4096);
		show("mp");
	}
	int ro = open("mp", O_RDONLY);
	char *s = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ro, 0);
	if (s == MAP_FAILED)
		printf("mmap shared ro: -1 %s\n", ename(errno));
	else {
		printf("shared read-only map reads \"%.6s\"\n", s);
		munmap(s, 4096);
	}
	R("mmap(MAP_SHARED, PROT_WRITE, O_RDONLY fd)",
	  mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0) == MAP_FAILED ? -1 : 0);
	R("mmap(directory)",
	  mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, open(".", O_RDONLY), 0) == MAP_FAILED ? -1 : 0);
	close(fd);
	close(ro);
	unlink("mp");
}

static void devproc(void)
{
	char buf[512];
	printf("-- /dev and /proc\n");
	int n = open("/dev/null", O_RDWR);
	R("write(/dev/null)", write(n, "x", 1));
	R("read(/dev/null)", read(n, buf, 1));
	close(n);
	int z = open("/dev/zero", O_RDONLY);
	buf[0] = 1;
	R("read(/dev/zero)", read(z, buf, 4));
	printf("zero byte %d\n", buf[0]);
	close(z);
	ssize_t l = readlink("/proc/self/exe", buf, sizeof buf);
	printf("/proc/self/exe is absolute: %d\n", l > 1 && buf[0] == '/');
	int f = open("a", O_RDONLY);
	char link[64];
	snprintf(link, sizeof link, "/proc/self/fd/%d", f);
	l = readlink(link, buf, sizeof buf - 1);
	buf[l < 0 ? 0 : l] = 0;
	printf("readlink(/proc/self/fd/N) ends %s\n", base(buf));
	list("/proc/self/fd");
	close(f);
	int st = open("/proc/self/stat", O_RDONLY);
	l = read(st, buf, sizeof buf - 1);
	close(st);
	buf[l < 0 ? 0 : l] = 0;
	int pid, ppid;
	char state;
	char comm[64];
	sscanf(buf, "%d %63s %c %d", &pid, comm, &state, &ppid);
	printf("/proc/self/stat: pid ok=%d state=%c ppid ok=%d comm ok=%d\n", pid == getpid(), state,
	       ppid == getppid(), strncmp(comm, "(fs_ops", 7) == 0);
	snprintf(link, sizeof link, "/proc/%d/stat", getpid());
	st = open(link, O_RDONLY);
	R("open(/proc/PID/stat)", st >= 0 ? 0 : -1);
	close(st); /* a /proc file cannot cross a VM-clone fork */
	R("open(/proc/999999/stat)", open("/proc/999999/stat", O_RDONLY));
}

static void forks(void)
{
	printf("-- fork\n");
	int fd = open("shared", O_CREAT | O_RDWR | O_TRUNC, 0644);
	int cx = open("a", O_RDONLY | O_CLOEXEC);
	write(fd, "parent1 ", 8);
	pid_t pid = fork();
	if (pid == 0) {
		write(fd, "child ", 6);
		put("from_child", "written by the child");
		_exit(fcntl(cx, F_GETFD) == FD_CLOEXEC ? 0 : 1);
	}
	int status;
	waitpid(pid, &status, 0);
	printf("child exit %d (O_CLOEXEC kept across fork)\n", WEXITSTATUS(status));
	R("offset after the child wrote", lseek(fd, 0, SEEK_CUR));
	write(fd, "parent2", 7);
	show("shared");
	show("from_child");
	close(fd);
	close(cx);
}

static void lock_at(int fd, int cmd, short type, off_t start, off_t len, const char *what)
{
	struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
	R(what, fcntl(fd, cmd, &fl));
}

static void show_lock(int fd, int cmd, off_t start, off_t len, pid_t holder)
{
	struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
	if (fcntl(fd, cmd, &fl) < 0) {
		printf("F_GETLK: -1 %s\n", ename(errno));
		return;
	}
	if (fl.l_type == F_UNLCK)
		printf("F_GETLK [%ld,+%ld): unlocked\n", (long)start, (long)len);
	else
		printf("F_GETLK [%ld,+%ld): %s [%ld,+%ld) by %s\n", (long)start, (long)len,
		       fl.l_type == F_WRLCK ? "write" : "read", (long)fl.l_start, (long)fl.l_len,
		       fl.l_pid == holder ? "the holder" : fl.l_pid == -1 ? "an OFD lock" : "?");
}

static void locks(void)
{
	int p[2], q[2], status;
	char c;

	printf("-- locks\n");
	int fd = open("lk", O_CREAT | O_RDWR | O_TRUNC, 0644);
	write(fd, "0123456789abcdefghij", 20);
	lock_at(fd, F_SETLK, F_WRLCK, 0, 10, "F_SETLK write [0,10)");
	lock_at(fd, F_SETLK, F_RDLCK, 15, 0, "F_SETLK read [15,EOF)");
	show_lock(fd, F_GETLK, 0, 100, 0); /* one's own locks never conflict */
	R("flock(LOCK_EX)", flock(fd, LOCK_EX));
	int ro = open("lk", O_RDONLY);
	lock_at(ro, F_SETLK, F_WRLCK, 0, 1, "F_SETLK write on an O_RDONLY fd");
	lock_at(ro, F_GETLK, F_UNLCK, 0, 1, "F_GETLK F_UNLCK");
	R("flock(bad op)", flock(fd, 0));
	pipe(p);
	pipe(q);
	pid_t me = getpid();
	pid_t pid = fork();
	if (pid == 0) {
		int mine = open("lk", O_RDWR);
		show_lock(mine, F_GETLK, 0, 100, me);
		show_lock(mine, F_GETLK, 12, 2, me);
		show_lock(mine, F_GETLK, 16, 1, me);
		lock_at(mine, F_SETLK, F_WRLCK, 5, 1, "child F_SETLK write [5,6)");
		lock_at(mine, F_SETLK, F_RDLCK, 15, 5, "child F_SETLK read [15,20)");
		lock_at(mine, F_SETLK, F_WRLCK, 10, 5, "child F_SETLK write [10,15)");
		lock_at(mine, F_OFD_SETLK, F_WRLCK, 0, 1, "child F_OFD_SETLK write [0,1)");
		R("child flock(new open, LOCK_EX|LOCK_NB)", flock(mine, LOCK_EX | LOCK_NB));
		R("child flock(inherited fd, LOCK_EX|LOCK_NB)", flock(fd, LOCK_EX | LOCK_NB));
		write(p[1], "x", 1);
		/* the parent drops its write lock: this wait ends; its result is printed
		 * once the parent has printed its unlock (q), so the two lines never mix */
		{
			struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_len = 10};
			long r = fcntl(mine, F_SETLKW, &fl);
			int e = errno;

			read(q[0], &c, 1);
			errno = e;
			R("child F_SETLKW write [0,10)", r);
		}
		_exit(0);
	}
	read(p[0], &c, 1);
	show_lock(fd, F_GETLK, 10, 5, pid);
	lock_at(fd, F_SETLK, F_UNLCK, 0, 10, "F_SETLK unlock [0,10)");
	write(q[1], "x", 1);
	waitpid(pid, &status, 0);
	printf("child exit %d\n", WEXITSTATUS(status));
	show_lock(fd, F_GETLK, 0, 100, 0); /* the child's locks ended with it */
	/* closing any fd of the file drops the process's record locks (POSIX) */
	lock_at(fd, F_SETLK, F_WRLCK, 0, 1, "F_SETLK write [0,1)");
	int other = open("lk", O_RDONLY);
	close(other);
	pid = fork();
	if (pid == 0) {
		int mine = open("lk", O_RDWR);
		show_lock(mine, F_GETLK, 0, 1, me);
		R("child flock(LOCK_SH|LOCK_NB) while the parent's LOCK_EX holds",
		  flock(mine, LOCK_SH | LOCK_NB));
		_exit(0);
	}
	waitpid(pid, &status, 0);
	R("flock(LOCK_UN)", flock(fd, LOCK_UN));
	int again = open("lk", O_RDONLY);
	R("flock(another open, LOCK_SH|LOCK_NB)", flock(again, LOCK_SH | LOCK_NB));
	close(again);
	close(ro);
	close(fd);
	close(p[0]);
	close(p[1]);
	close(q[0]);
	close(q[1]);
	unlink("lk");
}

static void procs(void)
{
	int p[2], status;
	char c, path[64], buf[512];

	printf("-- /proc of another process\n");
	pipe(p);
	pid_t pid = fork();
	if (pid == 0) {
		close(p[1]);
		read(p[0], &c, 1); /* asleep until the parent has looked */
		_exit(0);
	}
	snprintf(path, sizeof path, "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	buf[n < 0 ? 0 : n] = 0;
	int cpid = 0, ppid = 0;
	char comm[64] = "", state = '?';
	sscanf(buf, "%d %63s %c %d", &cpid, comm, &state, &ppid);
	printf("child's stat: pid ok=%d comm ok=%d ppid ok=%d\n", cpid == pid,
	       strncmp(comm, "(fs_ops", 7) == 0, ppid == getpid());
	close(fd);
	DIR *d = opendir("/proc");
	struct dirent *e;
	int seen = 0;
	while (d && (e = readdir(d)))
		if (atoi(e->d_name) == pid)
			seen = 1;
	if (d)
		closedir(d);
	printf("/proc lists the child: %d\n", seen);
	char mine[512], its[512];
	snprintf(path, sizeof path, "/proc/%d/exe", pid);
	ssize_t a = readlink("/proc/self/exe", mine, sizeof mine - 1);
	ssize_t b = readlink(path, its, sizeof its - 1);
	printf("the child's exe is ours: %d\n", a > 0 && a == b && memcmp(mine, its, a) == 0);
	snprintf(path, sizeof path, "/proc/%d/stat", pid);
	struct stat st;
	R("stat(/proc/CHILD)", stat(path, &st));
	close(p[0]);
	close(p[1]);
	waitpid(pid, &status, 0);
	R("open(/proc/CHILD/stat) once reaped", open(path, O_RDONLY));
}

int main(int argc, char **argv)
{
	top_pid = getpid();
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc != 2 && argc != 3)
		die("usage: fs_ops DIR [noowner]");
	if (mkdir(argv[1], 0755) < 0 || chdir(argv[1]) < 0)
		die("cannot make and enter %s: %s", argv[1], strerror(errno));
	opens();
	rw();
	stats();
	dirs();
	links();
	modes();
	fds();
	maps();
	devproc();
	if (argc == 2)
		owners();
	forks();
	locks();
	procs();
	list(".");
	printf("done\n");
	return 0;
}
