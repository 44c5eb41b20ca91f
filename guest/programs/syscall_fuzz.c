/*
 * syscall_fuzz [-s SEED] [-n N] [-f FORKS] [-c CHILD_CALLS] [-v]: issue N random
 * syscalls with random arguments and count the results.
 *
 * Syscall numbers come mostly from the set unifork supports (docs/syscalls.md),
 * some are random numbers 0..460 and, in the VM only, some are hypercalls
 * 0x1000..0x1010.  Arguments mix small ints, -1, huge values, random 64-bit
 * values, pointers into a local arena, just past it, misaligned, NULL,
 * unmapped addresses, fds 0..20 and mappings this program made.
 *
 * What would end the process, block for ever or fork is never issued at
 * random (exit, exit_group, fork/vfork/clone, execve, rt_sigreturn, pause;
 * kill/tkill/tgkill only with signal 0; wait4/waitid with WNOHANG; sleeps and
 * futex waits get a timeout below 1 ms; reads and writes only on non-blocking
 * fds, never on the console).  Lengths paired with a pointer into the arena
 * are clamped so that no syscall can write past it: there is no MMU in the VM.
 *
 * With -f FORKS (default 0: no fork, and the very call sequence of the seed
 * without -f) the fuzzer also forks, at most FORKS times in all, at random
 * points (fork, clone(SIGCHLD) and, in the VM, vfork).  Before each fork it
 * makes one or two non-blocking pipes, sometimes with data in them; their
 * ends join the fds the fuzzer draws, so both sides fuzz the same pipes (in
 * VM-clone mode: cross-VM pipes through the broker).  A child fuzzes at most
 * CHILD_CALLS calls (-c, default 2000) with a seed derived from its parent's,
 * may fork itself (depth 2 at most, from its parent's budget), reaps its own
 * children, sends its counts to its parent over a report pipe (one atomic
 * write) and _exits with a status its parent chose.  A parent polls its
 * children with WNOHANG, checks kill(child, 0), sometimes sends SIGKILL or
 * SIGTERM to one of them, and at the end waits for each, drains the reports
 * until EOF and checks that no child is left.  A child's status must be the
 * chosen one, or the signal sent to it.  Fork mode keeps the state of each
 * process private even under thread fork (globals shared): all mutable state
 * is in a struct fz; a child's (with its arena and errno counts) lives on its
 * own stack.  Random calls in fork mode never install a SIGCHLD disposition,
 * never clear O_NONBLOCK (F_SETFL, FIONBIO), add WNOWAIT to waitid, leave the
 * report pipes (fds 101..103) alone and unmap only their own mappings.
 *
 * The VM is detected with the probe hypercall (0x1000 -> "unifork").  Natively
 * the fuzzer is conservative: only supported syscalls, no random numbers, no
 * MAP_FIXED, munmap/mremap/mprotect/madvise only of its own mappings, no
 * brk moves, no setrlimit/setpgid/setsid, no SET_FS, no signal handlers,
 * open only of /dev/null, /dev/zero, /dev/urandom and paths that do not exist,
 * read-only ioctls, affinity only of itself.
 *
 * Output: "seed=S calls=N ok=K errors=E skipped=X vm=V hist=CHECKSUM" (with
 * " forks=F children_ok=C" appended in fork mode; N, K, E, X and the errno
 * counts then include every process's calls) and a line "errnos E:COUNT ..."
 * with every errno seen; exit status 0 (3 if a fork check failed: the reasons
 * are printed as "fork check: ..." lines).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "unifork_hypercalls.h"

#define HC_PROBE 0x1000
#define HC_MAGIC 0x756E69666F726BL
#define SAVED_FD 100 /* stdout, for the summary and -v */
#define UP_FD 101    /* a child's end of its parent's report pipe */
#define REP_R 102    /* this process's report pipe (read end) */
#define REP_W 103    /* ... and its write end, UP_FD in the children */
#define DATA_SIZE 4096
#define ARENA_SIZE 16384
#define MAX_ERRNO 4095
#define MAX_KIDS 16  /* unreaped children of one process */
#define MAX_PFD 16   /* pipe ends made for forks, drawn as fds */
#define MAX_DEPTH 2  /* the launched program is depth 0 */
#define REPORT_MAGIC 0x7a7a7566u
#define MAX_PAIRS 256
#define ST_NO_REPORT 102 /* a child that could not send its report */

#define raw6 unifork_syscall6 /* the runtime's raw syscall: no libc wrapper, no errno */

static long raw(long n, long a1, long a2, long a3)
{
	return raw6(n, a1, a2, a3, 0, 0, 0);
}

/* the launched program's arena: [slack 4096][data 4096][slack 8192]: iovecs
 * live in the first slack, "valid" pointers point into data, "past" pointers
 * at its end; clamped lengths keep every write inside the arena.  A forked
 * child gets its own on its stack (this one is shared under thread fork). */
static unsigned char arena0[ARENA_SIZE] __attribute__((aligned(4096)));
static uint32_t hist0[MAX_ERRNO + 1];
#define DATA(z) ((z)->arena + 4096)
#define IOV(z) ((struct iovec *)(z)->arena)

/* set before any fork, read-only afterwards: safe to share */
static int in_vm, fork_mode, verbose;
static unsigned long child_calls = 2000;

struct mapping { uint64_t addr, len; };

struct kid {
	long pid;
	int expect; /* the exit status it was given */
	int doom;   /* the signal it is to get (one child in six), 0 if none */
	int sig;    /* the signal sent to it, 0 if none */
};

/* everything a process changes while it fuzzes: private to it in every fork mode */
struct fz {
	uint64_t rng;  /* the call stream */
	uint64_t crng; /* fork-mode decisions: results never steer the call stream */
	unsigned char *arena;
	uint32_t *hist;
	struct mapping maps[16];
	int nmaps;
	int depth, forks_left, have_rep, lost;
	int up; /* where a child's report goes: UP_FD (REP_W if that could not be made) */
	long pid, ppid; /* for -v; the parent's pid at the fork (children) */
	int pfd[MAX_PFD], npfd;
	struct kid kids[MAX_KIDS];
	int nkids;
	unsigned long ok, errs, skipped;         /* own calls */
	unsigned long dcalls, dok, derrs, dskip; /* reported by descendants */
	unsigned long forks, kids_ok, bad;       /* own and reported */
};

static struct fz top;

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static uint64_t rnd(struct fz *z)
{
	return xorshift(&z->rng);
}

static uint64_t below(struct fz *z, uint64_t n)
{
	return rnd(z) % n;
}

static uint64_t cbelow(struct fz *z, uint64_t n)
{
	return xorshift(&z->crng) % n;
}

static uint64_t seed_state(uint64_t seed)
{
	uint64_t s = seed * 0x9E3779B97F4A7C15UL + 0x632BE59BD9B4E019UL;
	return s ? s : 1;
}

/* syscall numbers of the table (tender_service/rump/syscalls/table.py) */
static const int supported[] = {
	0, 1, 2, 3, 4, 5, 6, 8, 16, 17, 18, 19, 20, 21, 32, 33, 72, 79, 257, 262, 269, 292,
	22, 293, 9, 10, 11, 12, 25, 28, 13, 14, 62, 127, 131, 200, 234, 39, 56, 57, 58, 59,
	60, 61, 95, 97, 98, 102, 104, 107, 108, 109, 110, 111, 112, 115, 121, 124, 160, 186,
	218, 231, 247, 302, 35, 96, 201, 228, 229, 230, 202, 24, 203, 204, 309, 63, 99, 158,
	318,
};
#define NSUPPORTED ((int)(sizeof(supported) / sizeof(supported[0])))

enum cls { C_SMALL, C_MINUS1, C_HUGE, C_RANDOM, C_VALID, C_PAST, C_NULL, C_UNMAPPED,
	   C_MISALIGNED, C_FD, C_INT, C_MAPPING, NCLS };

static uint64_t page_up(uint64_t n)
{
	return (n + 4095) & ~4095UL;
}

static uint64_t gen(struct fz *z, enum cls *c)
{
	static const uint64_t huge[] = {
		0x7fffffffUL, 0x80000000UL, 0xffffffffUL, 0x7fffffffffffffffUL,
		0x8000000000000000UL, 0xfffffffffffff000UL, 1UL << 40, 0xffffffffffffffffUL - 15,
	};
	*c = (enum cls)below(z, NCLS);
	switch (*c) {
	case C_SMALL: return below(z, 65);
	case C_MINUS1: return (uint64_t)-1;
	case C_HUGE: return huge[below(z, 8)];
	case C_RANDOM: return rnd(z);
	case C_VALID: return (uint64_t)(uintptr_t)(DATA(z) + (below(z, DATA_SIZE) & ~7UL));
	case C_PAST: return (uint64_t)(uintptr_t)(DATA(z) + DATA_SIZE);
	case C_NULL: return 0;
	case C_UNMAPPED: return below(z, 2) ? 0x10 : 0xbad00000000UL;
	case C_MISALIGNED: return (uint64_t)(uintptr_t)(DATA(z) + (below(z, DATA_SIZE - 8) | 1));
	case C_FD:
		if (fork_mode && z->npfd && below(z, 2))
			return (uint64_t)z->pfd[below(z, z->npfd)]; /* the pipes shared by forks */
		return below(z, 21);
	case C_INT: return (uint32_t)rnd(z);
	case C_MAPPING:
		if (z->nmaps && fork_mode) {
			/* inside its own mapping: under thread fork a neighbour may be another
			 * process's (munmap of it would leave that process a stale pointer) */
			struct mapping *m = &z->maps[below(z, z->nmaps)];
			return m->addr + (below(z, 4) ? 0 : below(z, page_up(m->len)));
		}
		if (z->nmaps)
			return z->maps[below(z, z->nmaps)].addr + (below(z, 4) ? 0 : below(z, 8192));
		*c = C_SMALL;
		return below(z, 65);
	default: return 0;
	}
}

static int in_arena(struct fz *z, uint64_t p)
{
	return p >= (uint64_t)(uintptr_t)z->arena && p < (uint64_t)(uintptr_t)z->arena + ARENA_SIZE;
}

static int readable(enum cls c)
{
	return c == C_VALID || c == C_PAST || c == C_MISALIGNED || c == C_MAPPING;
}

/* keep a write of len bytes at ptr inside the arena (or inside a mapping natively) */
static void clamp(struct fz *z, uint64_t ptr, uint64_t *len, uint64_t unit)
{
	if (in_arena(z, ptr) && *len * unit > DATA_SIZE)
		*len = below(z, DATA_SIZE / unit + 1);
	else if (!in_vm && !in_arena(z, ptr) && *len > 4096)
		*len = below(z, 4097); /* natively: never large writes into our mappings */
}

/* the console (fds 0..2 at start): never read (it may block) nor written with data */
static struct stat console[3];
static int have_console[3];

static int is_console(long fd)
{
	struct stat st;
	int i;
	if (raw(SYS_fstat, fd, (long)&st, 0) < 0)
		return -1; /* not open */
	for (i = 0; i < 3; i++)
		if (have_console[i] && st.st_dev == console[i].st_dev &&
		    st.st_ino == console[i].st_ino && st.st_rdev == console[i].st_rdev &&
		    st.st_mode == console[i].st_mode)
			return 1;
	if (!in_vm && !S_ISFIFO(st.st_mode) && !S_ISCHR(st.st_mode))
		return 1; /* natively, anything but our pipes and devices is off limits */
	return 0;
}

/* fd may be used for data: not the console, and non-blocking */
static int data_fd(long fd)
{
	int c = is_console(fd);
	if (c < 0)
		return 1; /* EBADF path */
	if (c)
		return 0;
	long fl = raw(SYS_fcntl, fd, F_GETFL, 0);
	if (fl >= 0 && !(fl & O_NONBLOCK))
		raw(SYS_fcntl, fd, F_SETFL, fl | O_NONBLOCK);
	return 1;
}

static void put_timespec(struct fz *z, uint64_t *arg, enum cls c)
{
	/* a sleep or wait timeout: at most 1 ms, or invalid (EINVAL/EFAULT) */
	long *ts;
	if (c == C_UNMAPPED || c == C_RANDOM || c == C_HUGE || c == C_MINUS1)
		return; /* EFAULT */
	if (!in_arena(z, *arg) || *arg + 16 > (uint64_t)(uintptr_t)(DATA(z) + DATA_SIZE))
		*arg = (uint64_t)(uintptr_t)(DATA(z) + 8 * below(z, DATA_SIZE / 8 - 2));
	ts = (long *)(uintptr_t)(*arg & ~7UL);
	*arg = (uint64_t)(uintptr_t)ts;
	switch (below(z, 6)) {
	case 0: ts[0] = -1; ts[1] = 0; break;
	case 1: ts[0] = 0; ts[1] = 1000000000; break;
	case 2: ts[0] = 0; ts[1] = -5; break;
	default: ts[0] = 0; ts[1] = (long)below(z, 1000000); break;
	}
}

static const char *const safe_paths[] = {
	"/dev/null", "/dev/zero", "/dev/urandom", "/nonexistent/x", "", "/dev/nothing",
};
static const char *const vm_paths[] = {
	"/", ".", "/dev", "/etc/passwd", "/dev/tty", "/proc/self/maps", "//dev//null",
	"/dev/null/", "../../dev/zero",
};

static void put_path(struct fz *z, uint64_t *arg, enum cls c)
{
	char *p;
	if (!(c == C_VALID || c == C_MISALIGNED)) {
		if (!in_vm && c != C_NULL && c != C_UNMAPPED)
			*arg = (uint64_t)(uintptr_t)(DATA(z) + below(z, DATA_SIZE - 64));
		else
			return;
	}
	p = (char *)(uintptr_t)*arg;
	if ((char *)p + 64 > (char *)DATA(z) + DATA_SIZE)
		p = (char *)DATA(z) + DATA_SIZE - 64, *arg = (uint64_t)(uintptr_t)p;
	if (in_vm && below(z, 4) == 0) {
		int i, n = (int)below(z, 63);
		for (i = 0; i < n; i++)
			p[i] = (char)(1 + below(z, 255));
		p[n] = below(z, 8) ? 0 : 'x'; /* sometimes unterminated in 64 bytes */
	} else if (in_vm && below(z, 3) == 0) {
		strcpy(p, vm_paths[below(z, sizeof(vm_paths) / sizeof(vm_paths[0]))]);
	} else {
		strcpy(p, safe_paths[below(z, sizeof(safe_paths) / sizeof(safe_paths[0]))]);
	}
}

/* iovecs for readv/writev in the arena's first slack */
static void put_iov(struct fz *z, uint64_t *iov, uint64_t *cnt, enum cls c, int console_ok)
{
	int i, n;
	if (!readable(c) || !in_arena(z, *iov)) {
		if (c != C_MAPPING)
			return; /* NULL, unmapped, random: EFAULT/EINVAL paths */
	}
	n = (int)below(z, 9);
	for (i = 0; i < n; i++) {
		enum cls ec;
		uint64_t b = gen(z, &ec), l = gen(z, &ec);
		if (console_ok && (readable(ec) || ec == C_INT))
			b = 0xbad00000000UL;
		else if (readable(ec) && !in_arena(z, b))
			b = (uint64_t)(uintptr_t)(DATA(z) + below(z, DATA_SIZE));
		if (in_arena(z, b) || !in_vm)
			l = below(z, 257);
		IOV(z)[i].iov_base = (void *)(uintptr_t)b;
		IOV(z)[i].iov_len = l;
	}
	*iov = (uint64_t)(uintptr_t)IOV(z);
	if (below(z, 8))
		*cnt = (uint64_t)n;
}

static void ignore_sigpipe(void)
{
	/* struct k_sigaction: handler, flags, restorer, mask */
	unsigned long act[4] = { (unsigned long)SIG_IGN, 0, 0, 0 };
	raw6(SYS_rt_sigaction, SIGPIPE, (long)act, 0, 8, 0, 0);
}

/* fds the fuzzer keeps for itself: stdout's copy and, in fork mode, the report pipes */
static int is_self_fd(uint64_t fd)
{
	return (int)fd == SAVED_FD || (fork_mode && (int)fd >= UP_FD && (int)fd <= REP_W);
}

/*
 * Make the call safe (or say it must be skipped: return 0).  Applies to
 * every number, whether drawn from the table or at random.
 */
static int sanitize(struct fz *z, long nr, uint64_t *a, enum cls *c)
{
	int native = !in_vm;
	switch (nr) {
	case 56: case 57: case 58: case 59: case 60: case 231: case 15: case 34:
		return 0; /* clone, fork, vfork, execve, exit, exit_group, rt_sigreturn, pause */
	case 37: case 38: case 128: case 129: case 130:
		return 0; /* alarm, setitimer (a SIGALRM ends the run), sigtimedwait, sigqueue, sigsuspend */
	case 23: case 270: case 271: case 441: case 42: case 43: case 288:
		return 0; /* select, pselect6, ppoll, epoll_pwait2, connect, accept(4): may wait for ever */
	case 7: /* poll(fds, n, timeout) */
		a[2] = 0;
		clamp(z, a[0], &a[1], 8);
		return 1;
	case 232: case 281: /* epoll_wait, epoll_pwait(epfd, events, max, timeout) */
		a[3] = 0;
		clamp(z, a[1], &a[2], 12);
		return 1;
	case 44: case 45: /* sendto, recvfrom(fd, buf, len, flags, ...) */
		if (fork_mode && is_self_fd(a[0]))
			return 0;
		a[3] |= 0x40; /* MSG_DONTWAIT: a random socket is a blocking one */
		clamp(z, a[1], &a[2], 1);
		return 1;
	case 46: case 47: /* sendmsg, recvmsg(fd, msg, flags) */
		if (fork_mode && is_self_fd(a[0]))
			return 0;
		a[2] |= 0x40;
		return in_vm && !in_arena(z, a[1]); /* a msghdr in the arena could point anywhere */
	case 0: case 17: /* read, pread64 */
		if ((int)a[0] == 0)
			return 0;
		if (fork_mode && is_self_fd(a[0]))
			return 0;
		if (!data_fd((int)a[0]))
			return 0;
		clamp(z, a[1], &a[2], 1);
		return 1;
	case 1: case 18: /* write, pwrite64 */
		if (fork_mode && is_self_fd(a[0]))
			return 0;
		if (is_console((int)a[0]) == 1 && readable(c[1]))
			return 0;
		if (!data_fd((int)a[0]) && readable(c[1]))
			return 0;
		if (is_console((int)a[0]) == 1) {
			if (c[1] == C_INT)
				a[1] = 0xbad00000000UL; /* a 32-bit value may be a valid address */
			if (native && nr == 18)
				a[3] = 0; /* a faulting pwrite64 may still extend a redirected stdout */
		}
		clamp(z, a[1], &a[2], 1);
		return 1;
	case 19: case 20: { /* readv, writev */
		int cons;
		if (fork_mode && is_self_fd(a[0]))
			return 0;
		cons = is_console((int)a[0]) == 1;
		if (nr == 19 && (cons || (int)a[0] == 0))
			return 0;
		if (!cons && !data_fd((int)a[0]))
			return 0;
		put_iov(z, &a[1], &a[2], c[1], cons);
		if (cons && a[1] == (uint64_t)(uintptr_t)IOV(z))
			return in_vm; /* bases all invalid: EFAULT, no output */
		return 1;
	}
	case 2: /* open(path, flags, mode) */
		put_path(z, &a[0], c[0]);
		if (native)
			a[1] &= O_ACCMODE | O_NONBLOCK | O_CLOEXEC;
		return 1;
	case 257: /* openat(dirfd, path, flags, mode) */
		put_path(z, &a[1], c[1]);
		if (native)
			a[2] &= O_ACCMODE | O_NONBLOCK | O_CLOEXEC;
		return 1;
	case 4: case 6: case 21: /* stat, lstat, access */
		put_path(z, &a[0], c[0]);
		return 1;
	case 262: case 269: /* newfstatat, faccessat */
		put_path(z, &a[1], c[1]);
		return 1;
	case 8: /* lseek */
		if (native && is_console((int)a[0]) == 1)
			a[1] = 0, a[2] = SEEK_CUR; /* a redirected stdout would grow a sparse hole */
		return 1;
	case 3: /* close */
		return !is_self_fd(a[0]);
	case 32: /* dup: a copy of a report pipe end would let random calls at it */
		return !fork_mode || !is_self_fd(a[0]);
	case 33: case 292: /* dup2, dup3 */
		return !is_self_fd(a[1]) && !is_self_fd(a[0]);
	case 72: /* fcntl */
		if (is_self_fd(a[0]))
			return 0;
		if ((int)a[1] == F_SETLKW || (int)a[1] == 38 /* F_OFD_SETLKW */)
			return 0;
		if (native) {
			static const int ok[] = { F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL,
						  F_SETFL };
			a[1] = (uint64_t)ok[below(z, 6)];
			if (a[1] == F_SETFL && is_console((int)a[0]))
				a[1] = F_GETFL;
		}
		if (fork_mode && (uint32_t)a[1] == F_SETFL)
			a[2] |= O_NONBLOCK; /* the pipes' descriptions are shared with other processes */
		return 1;
	case 16: /* ioctl */
		if (native) {
			static const unsigned long ok[] = { 0x5401 /* TCGETS */, 0x5413 /* TIOCGWINSZ */,
							    0x541B /* FIONREAD */, 0x5421 /* FIONBIO */ };
			a[1] = ok[below(z, 4)];
			if (a[1] == 0x5421 && is_console((int)a[0]))
				a[1] = 0x541B;
		}
		if (in_arena(z, a[2]) || readable(c[2]))
			a[2] = (uint64_t)(uintptr_t)(DATA(z) + 8 * below(z, DATA_SIZE / 8 - 16));
		if (fork_mode && (uint32_t)a[1] == 0x5421 && in_arena(z, a[2]))
			*(int *)(uintptr_t)a[2] = 1; /* FIONBIO only ever sets O_NONBLOCK */
		return 1;
	case 79: /* getcwd */
		clamp(z, a[0], &a[1], 1);
		return 1;
	case 115: /* getgroups(size, list) */
		clamp(z, a[1], &a[0], 4);
		return 1;
	case 204: /* sched_getaffinity(pid, len, mask) */
		clamp(z, a[2], &a[1], 1);
		return 1;
	case 203: /* sched_setaffinity */
		if (native)
			a[0] = 0;
		return 1;
	case 318: /* getrandom */
		clamp(z, a[0], &a[1], 1);
		if (native)
			a[2] = (a[2] & 3) | 1; /* GRND_NONBLOCK */
		return 1;
	case 13: /* rt_sigaction */
		a[1] = 0; /* never install a handler: the VM runs handlers too (issue 15) */
		if (fork_mode && (int)a[0] == SIGCHLD)
			a[1] = 0; /* SIG_IGN would reap the children behind the parent's back */
		clamp(z, a[2], &a[3], 1);
		return 1;
	case 14: /* rt_sigprocmask */
		clamp(z, a[2], &a[3], 1);
		return 1;
	case 127: /* rt_sigpending */
		clamp(z, a[0], &a[1], 1);
		return 1;
	case 131: /* sigaltstack */
		if (native)
			a[0] = 0;
		return 1;
	case 62: /* kill */
		a[1] = 0;
		return 1;
	case 200: /* tkill */
		a[1] = 0;
		return 1;
	case 234: /* tgkill */
		a[2] = 0;
		return 1;
	case 61: /* wait4 */
		a[2] |= 1; /* WNOHANG */
		return 1;
	case 247: /* waitid */
		a[2] |= 1;
		a[3] |= 1; /* WNOHANG (options are the 4th argument) */
		if (fork_mode)
			a[3] |= 0x01000000; /* WNOWAIT: the children are reaped by wait4 only */
		return 1;
	case 35: /* nanosleep */
		put_timespec(z, &a[0], c[0]);
		return 1;
	case 230: /* clock_nanosleep(clock, flags, req, rem) */
		if (native || below(z, 2))
			a[0] = below(z, 2) ? 0 : 1; /* REALTIME, MONOTONIC */
		put_timespec(z, &a[2], c[2]);
		return 1;
	case 202: { /* futex(uaddr, op, val, timeout, uaddr2, val3) */
		int op = (int)a[1] & 127;
		if (native) {
			static const int ok[] = { 0, 1, 3, 4, 5, 9, 10 };
			op = ok[below(z, 7)];
			a[1] = (uint64_t)(op | (below(z, 2) ? 128 : 0) | (below(z, 4) ? 0 : 256));
			if (!in_arena(z, a[0]))
				a[0] = below(z, 2) ? 0 : (uint64_t)(uintptr_t)(DATA(z) + 4 * below(z, DATA_SIZE / 4));
			if (!in_arena(z, a[4]))
				a[4] = below(z, 2) ? 0x10 : (uint64_t)(uintptr_t)(DATA(z) + 4 * below(z, DATA_SIZE / 4));
		}
		if (op == 0 || op == 9 || op == 6 || op == 11 || op == 13)
			put_timespec(z, &a[3], c[3] == C_NULL ? C_VALID : c[3]);
		return 1;
	}
	case 9: /* mmap */
		if (native) {
			a[1] = a[1] % (16u << 20) + 1;
			a[3] = (a[3] & (0x3 | 0x20 | 0x4000 | 0x8000)); /* kind, ANON, NORESERVE, POPULATE */
			if (!(a[3] & 3))
				a[3] |= 2;
		}
		return 1;
	case 11: case 10: case 28: case 25: { /* munmap, mprotect, madvise, mremap */
		int i;
		if (!native)
			return 1;
		if (!z->nmaps)
			return 0;
		i = (int)below(z, z->nmaps);
		a[0] = z->maps[i].addr;
		if (nr == 11) {
			a[1] = z->maps[i].len;
			z->maps[i] = z->maps[--z->nmaps];
		} else if (nr == 10) {
			a[1] = below(z, z->maps[i].len + 1);
		} else if (nr == 28) {
			static const int adv[] = { 0, 1, 2, 3, 4, 8, 10, 11, 14, 15 };
			a[1] = below(z, z->maps[i].len + 1);
			a[2] = adv[below(z, 10)];
		} else {
			a[1] = z->maps[i].len;
			a[2] = a[2] % (16u << 20) + 1;
			a[3] = 1; /* MREMAP_MAYMOVE */
		}
		return 1;
	}
	case 12: /* brk */
		if (native)
			a[0] = 0;
		return 1;
	case 158: /* arch_prctl */
		if (native) {
			a[0] = below(z, 2) ? 0x1003 : 0x1004; /* ARCH_GET_FS, ARCH_GET_GS */
			if (!in_arena(z, a[1]))
				a[1] = (uint64_t)(uintptr_t)(DATA(z) + 8 * below(z, DATA_SIZE / 8));
		}
		return 1;
	case 109: case 112: case 160: /* setpgid, setsid, setrlimit */
		return in_vm;
	case 302: /* prlimit64(pid, res, new, old) */
		if (native)
			a[2] = 0;
		return 1;
	case 218: /* set_tid_address */
		if (native && !in_arena(z, a[0]))
			a[0] = 0;
		return 1;
	default:
		if (native) {
			int i;
			for (i = 0; i < NSUPPORTED; i++)
				if (supported[i] == nr)
					return 1;
			return 0;
		}
		return 1;
	}
}

/* calls whose first argument is an fd (read, write, close, fstat, lseek, ioctl,
 * pread64, pwrite64, readv, writev, dup, dup2, fcntl, dup3) */
static int takes_fd(long nr)
{
	switch (nr) {
	case 0: case 1: case 3: case 5: case 8: case 16: case 17: case 18: case 19: case 20:
	case 32: case 33: case 72: case 292:
		return 1;
	default:
		return 0;
	}
}

/* in the VM under fork: forget mappings a call may have freed (never reuse a stale pointer) */
static void forget_mappings(struct fz *z, uint64_t addr)
{
	int j;
	for (j = z->nmaps - 1; j >= 0; j--)
		if (z->maps[j].addr <= addr && addr < z->maps[j].addr + page_up(z->maps[j].len) + 4096)
			z->maps[j] = z->maps[--z->nmaps];
}

/* -- fork mode ----------------------------------------------------------------------- */

struct report {
	uint32_t magic, npairs;
	uint64_t calls, ok, errs, skipped, forks, kids_ok, bad;
	uint32_t pairs[2 * MAX_PAIRS]; /* errno, count */
};
#define REPORT_HEAD ((long)offsetof(struct report, pairs))

/* what a child needs from its parent, copied before the fork (on the parent's stack) */
struct child_args {
	uint64_t seed;
	unsigned long calls;
	int expect, budget, depth, npfd;
	int pfd[MAX_PFD];
	long ppid;
};

/* A fork check's finding on the saved stdout (fd 100): not guest_common.h's say(). */
static void say(struct fz *z, const char *what, long a, long b, long c)
{
	dprintf(SAVED_FD, "fork check: pid %ld (depth %d): %s %ld %ld %ld\n", z->pid, z->depth, what,
		a, b, c);
}

static void add_pfd(struct fz *z, int fd)
{
	if (fd >= SAVED_FD && fd <= REP_W)
		return; /* a child's 101..103 are its report pipes whatever they were here */
	if (z->npfd < MAX_PFD)
		z->pfd[z->npfd++] = fd;
	else
		z->pfd[cbelow(z, MAX_PFD)] = fd;
}

static void open_reports(struct fz *z)
{
	int p[2], j;
	if (raw(SYS_pipe2, (long)p, O_CLOEXEC, 0) < 0)
		return;
	/* with fds 0..99 all in use the pipe itself may be at 102..104: move it up first */
	for (j = 0; j < 2; j++) {
		long hi = raw(SYS_fcntl, p[j], F_DUPFD, 110);
		raw(SYS_close, p[j], 0, 0);
		p[j] = (int)hi;
	}
	if (p[0] >= 0 && p[1] >= 0 && raw(SYS_dup2, p[0], REP_R, 0) == REP_R &&
	    raw(SYS_dup2, p[1], REP_W, 0) == REP_W && raw(SYS_fcntl, REP_R, F_SETFL, O_NONBLOCK) == 0)
		z->have_rep = 1;
	for (j = 0; j < 2; j++)
		if (p[j] >= 0)
			raw(SYS_close, p[j], 0, 0);
	if (!z->have_rep) {
		raw(SYS_close, REP_R, 0, 0);
		raw(SYS_close, REP_W, 0, 0);
	}
}

/* read whole reports: each was one write of at most PIPE_BUF bytes, so it is all there */
static void drain_reports(struct fz *z)
{
	struct report rep;
	uint32_t j;
	for (;;) {
		long r = raw(SYS_read, REP_R, (long)&rep, REPORT_HEAD);
		if (r == 0 || r == -EAGAIN)
			return;
		if (r != REPORT_HEAD || rep.magic != REPORT_MAGIC || rep.npairs > MAX_PAIRS) {
			say(z, "bad report head (read, magic, pairs):", r, rep.magic, rep.npairs);
			if (r > 0) {
				char hex[3 * 64 + 1];
				int q;
				for (q = 0; q < r && q < 64; q++)
					snprintf(hex + 3 * q, 4, " %02x", ((unsigned char *)&rep)[q]);
				dprintf(SAVED_FD, "fork check: pid %ld: the bytes:%s\n", z->pid, hex);
			}
			z->bad++;
			return;
		}
		if (rep.npairs) {
			long want = (long)rep.npairs * 8;
			r = raw(SYS_read, REP_R, (long)rep.pairs, want);
			if (r != want) {
				say(z, "short report body (read, wanted, 0):", r, want, 0);
				z->bad++;
				return;
			}
		}
		z->dcalls += rep.calls;
		z->dok += rep.ok;
		z->derrs += rep.errs;
		z->dskip += rep.skipped;
		z->forks += rep.forks;
		z->kids_ok += rep.kids_ok;
		z->bad += rep.bad;
		for (j = 0; j < rep.npairs; j++)
			if (rep.pairs[2 * j] <= MAX_ERRNO)
				z->hist[rep.pairs[2 * j]] += rep.pairs[2 * j + 1];
	}
}

/* a child was reaped with status st (-1: by a random wait4 that did not say) */
static void settle(struct fz *z, int i, int st)
{
	struct kid *k = &z->kids[i];
	int good = st == -1 || (WIFEXITED(st) && WEXITSTATUS(st) == k->expect) ||
		   (k->sig && WIFSIGNALED(st) && WTERMSIG(st) == k->sig);
	if (good)
		z->kids_ok++;
	else {
		say(z, "child ended with (pid, status, expected exit):", k->pid, st, k->expect);
		z->bad++;
	}
	z->kids[i] = z->kids[--z->nkids];
}

static int find_kid(struct fz *z, long pid)
{
	int i;
	for (i = 0; i < z->nkids; i++)
		if (z->kids[i].pid == pid)
			return i;
	return -1;
}

/* wait for child i (WNOHANG or not); ECHILD is only fine after a faulting wait4 */
static void reap(struct fz *z, int i, int hang)
{
	int st = 0;
	long r = raw6(SYS_wait4, z->kids[i].pid, (long)&st, hang ? 0 : WNOHANG, 0, 0, 0);
	if (r == z->kids[i].pid) {
		settle(z, i, st);
	} else if (r == -ECHILD && z->lost > 0) {
		z->lost--; /* Linux reaps before it faults on the status pointer */
		settle(z, i, -1);
	} else if (r != 0 || hang) {
		say(z, "wait4 of a child returned (pid, result, hang):", z->kids[i].pid, r, hang);
		z->bad++;
		z->kids[i] = z->kids[--z->nkids];
	}
}

static void poll_kids(struct fz *z)
{
	int i;
	for (i = z->nkids - 1; i >= 0; i--)
		reap(z, i, 0);
	if (z->have_rep)
		drain_reports(z);
}

static void kill_step(struct fz *z)
{
	int i = cbelow(z, z->nkids);
	struct kid *k = &z->kids[i];
	long r = raw(SYS_kill, k->pid, 0, 0);
	if (r == -ESRCH && z->lost > 0) {
		z->lost--; /* reaped by a random wait4 that then faulted (Linux) */
		settle(z, i, -1);
		return;
	}
	if (r != 0) {
		say(z, "kill(child, 0) returned (pid, result, 0):", k->pid, r, 0);
		z->bad++;
	}
	if (k->doom && !k->sig) {
		k->sig = k->doom;
		r = raw(SYS_kill, k->pid, k->sig, 0);
		if (verbose)
			dprintf(SAVED_FD, "[%ld] kill(%ld, %d) = %ld\n", z->pid, k->pid, k->sig, r);
		if (r != 0) {
			say(z, "kill(child, sig) returned (pid, sig, result):", k->pid, k->sig, r);
			z->bad++;
		}
	}
}

static void fuzz(struct fz *z, unsigned long n);
static void finish(struct fz *z);

/* send the counts up and end (never returns) */
static __attribute__((noreturn)) void report_up(struct fz *z, unsigned long n, int expect)
{
	struct report rep;
	uint32_t j, np = 0;
	long size, r;
	memset(&rep, 0, REPORT_HEAD);
	rep.magic = REPORT_MAGIC;
	rep.calls = n + z->dcalls;
	rep.ok = z->ok + z->dok;
	rep.errs = z->errs + z->derrs;
	rep.skipped = z->skipped + z->dskip;
	rep.forks = z->forks;
	rep.kids_ok = z->kids_ok;
	rep.bad = z->bad;
	for (j = 0; j <= MAX_ERRNO; j++)
		if (z->hist[j]) {
			if (np == MAX_PAIRS) {
				rep.bad++; /* cannot happen: fewer errno values exist */
				break;
			}
			rep.pairs[2 * np] = j;
			rep.pairs[2 * np + 1] = z->hist[j];
			np++;
		}
	rep.npairs = np;
	size = REPORT_HEAD + 8L * np;
	do
		r = raw(SYS_write, z->up, (long)&rep, size);
	while (r == -EINTR);
	_exit(r == size ? expect : ST_NO_REPORT);
}

/* the forked child: fresh private state on this stack, then fuzz, reap, report */
static __attribute__((noreturn, noinline)) void child_main(const struct child_args *ca)
{
	unsigned char buf[ARENA_SIZE + 4096];
	uint32_t hist[MAX_ERRNO + 1];
	struct fz z;

	memset(&z, 0, sizeof z);
	memset(hist, 0, sizeof hist);
	z.arena = (unsigned char *)(((uintptr_t)buf + 4095) & ~(uintptr_t)4095);
	z.hist = hist;
	z.rng = seed_state(ca->seed);
	z.crng = seed_state(ca->seed ^ 0xC0FFEE);
	z.depth = ca->depth;
	z.forks_left = ca->budget;
	z.npfd = ca->npfd;
	memcpy(z.pfd, ca->pfd, sizeof z.pfd);
	z.pid = raw(SYS_getpid, 0, 0, 0);
	z.ppid = ca->ppid;
	/* the parent's report pipe: keep only the write end, as UP_FD (a random
	 * setrlimit(RLIMIT_NOFILE) may forbid fd 101: then as it is, and no forks) */
	z.up = UP_FD;
	if (raw(SYS_dup2, REP_W, UP_FD, 0) == UP_FD)
		raw(SYS_close, REP_W, 0, 0);
	else
		z.up = REP_W, z.forks_left = 0;
	raw(SYS_close, REP_R, 0, 0);
	if (z.depth == 1 && raw(SYS_getppid, 0, 0, 0) != z.ppid) {
		say(&z, "getppid() differs from the parent's pid (parent, 0, 0):", z.ppid, 0, 0);
		z.bad++;
	}
	if (z.forks_left)
		open_reports(&z);
	fuzz(&z, ca->calls);
	finish(&z);
	report_up(&z, ca->calls, ca->expect);
}

static void fork_event(struct fz *z)
{
	struct child_args ca;
	int np = 1 + (int)cbelow(z, 2), j, kind = (int)cbelow(z, 10), doom = (int)cbelow(z, 12);
	int max_budget = z->depth + 1 < MAX_DEPTH && z->forks_left > 1 ? z->forks_left - 1 : 0;
	long pid;

	memset(&ca, 0, sizeof ca);
	ca.seed = xorshift(&z->crng);
	ca.calls = 1 + cbelow(z, child_calls);
	ca.expect = (int)cbelow(z, 100);
	ca.budget = max_budget ? (int)cbelow(z, (max_budget < 2 ? max_budget : 2) + 1) : 0;
	ca.depth = z->depth + 1;
	ca.ppid = z->pid;
	z->forks_left -= 1 + ca.budget;
	if (z->nkids == MAX_KIDS) {
		if (z->have_rep)
			drain_reports(z);
		reap(z, 0, 1);
	}
	for (j = 0; j < np; j++) {
		int p[2], cloexec = !cbelow(z, 4);
		unsigned long fill = cbelow(z, 3) ? 0 : cbelow(z, DATA_SIZE + 1);
		if (raw(SYS_pipe2, (long)p, O_NONBLOCK | (cloexec ? O_CLOEXEC : 0), 0) < 0)
			continue;
		add_pfd(z, p[0]);
		add_pfd(z, p[1]);
		if (fill)
			raw(SYS_write, p[1], (long)DATA(z), (long)fill);
	}
	ca.npfd = z->npfd;
	memcpy(ca.pfd, z->pfd, sizeof ca.pfd);
	if (kind == 9 && !in_vm)
		kind = 0; /* natively vfork's child may not return from this function */
	if (kind < 7)
		pid = fork();
	else if (kind < 9)
		pid = raw6(SYS_clone, SIGCHLD, 0, 0, 0, 0, 0);
	else
		pid = vfork();
	if (pid == 0)
		child_main(&ca);
	if (pid < 0) {
		if (verbose)
			dprintf(SAVED_FD, "[%ld] fork failed: %ld\n", z->pid, pid < -1 ? pid : -errno);
		return;
	}
	if (verbose)
		dprintf(SAVED_FD, "[%ld] forked %ld (kind %d, %lu calls, budget %d, exit %d)\n", z->pid,
			pid, kind, ca.calls, ca.budget, ca.expect);
	z->forks++;
	z->kids[z->nkids].pid = pid;
	z->kids[z->nkids].expect = ca.expect;
	z->kids[z->nkids].doom = doom == 0 ? SIGKILL : doom == 1 ? SIGTERM : 0;
	z->kids[z->nkids].sig = 0;
	z->nkids++;
}

/* between two calls: maybe fork, poll the children, signal one */
static void fork_step(struct fz *z, unsigned long i, unsigned long n)
{
	if (z->nkids && cbelow(z, 64) == 0)
		poll_kids(z);
	if (z->nkids && cbelow(z, 256) == 0)
		kill_step(z);
	if (z->depth == 1 && cbelow(z, 512) == 0) {
		long r = raw(SYS_kill, z->ppid, 0, 0);
		if (r != 0) {
			say(z, "kill(parent, 0) returned (parent, result, 0):", z->ppid, r, 0);
			z->bad++;
		}
	}
	if (z->forks_left > 0 && z->have_rep && cbelow(z, (n - i) / (unsigned long)z->forks_left + 1) == 0)
		fork_event(z);
}

/* wait for every child, then read every report until EOF */
static void finish(struct fz *z)
{
	char c;
	while (z->nkids) {
		if (z->have_rep)
			drain_reports(z);
		reap(z, z->nkids - 1, 1);
	}
	if (!z->have_rep)
		return;
	raw(SYS_close, REP_W, 0, 0);
	raw(SYS_fcntl, REP_R, F_SETFL, 0);
	drain_reports(z);
	if (raw(SYS_read, REP_R, (long)&c, 1) != 0) {
		say(z, "no EOF on the report pipe", 0, 0, 0);
		z->bad++;
	}
	raw(SYS_close, REP_R, 0, 0);
}

static void fuzz(struct fz *z, unsigned long n)
{
	unsigned long i;
	int j;
	long fsbase = 0;

	raw(SYS_arch_prctl, 0x1003, (long)&fsbase, 0);
	for (i = 0; i < n;) {
		uint64_t a[6];
		enum cls c[6];
		long nr, r;
		uint64_t pick;

		if (fork_mode)
			fork_step(z, i, n);
		pick = below(z, 100);
		if (pick < 85)
			nr = supported[below(z, NSUPPORTED)];
		else if (pick < 95 || !in_vm)
			nr = (long)below(z, 461);
		else
			nr = 0x1000 + (long)below(z, 0x11);
		for (j = 0; j < 6; j++)
			a[j] = gen(z, &c[j]);
		if (fork_mode && z->npfd && takes_fd(nr) && below(z, 2)) {
			a[0] = (uint64_t)z->pfd[below(z, z->npfd)]; /* aim at the shared pipes */
			c[0] = C_FD;
		}
		if (!sanitize(z, nr, a, c)) {
			z->skipped++;
			continue;
		}
		if (verbose) {
			char who[32] = "";
			if (z->depth)
				snprintf(who, sizeof who, "[%ld] ", z->pid);
			dprintf(SAVED_FD, "%s%lu: %ld(%#lx, %#lx, %#lx, %#lx, %#lx, %#lx)\n", who, i, nr,
				(unsigned long)a[0], (unsigned long)a[1], (unsigned long)a[2],
				(unsigned long)a[3], (unsigned long)a[4], (unsigned long)a[5]);
		}
		r = raw6(nr, (long)a[0], (long)a[1], (long)a[2], (long)a[3], (long)a[4], (long)a[5]);
		if (nr == 158 && (a[0] == 0x1002 || a[0] == 0x1001)) /* SET_FS/GS: put TLS back */
			raw(SYS_arch_prctl, 0x1002, fsbase, 0);
		if (nr == 13)
			ignore_sigpipe();
		i++;
		if (r < 0 && r >= -MAX_ERRNO) {
			z->errs++;
			z->hist[-r]++;
			if (fork_mode && nr == 61 && r == -EFAULT)
				z->lost++;
		} else {
			z->ok++;
			if (nr == 9 && z->nmaps < 16 && r > 0 && !(fork_mode && (a[3] & 0x100010)))
				z->maps[z->nmaps].addr = (uint64_t)r, z->maps[z->nmaps++].len = a[1];
			if (nr == 25 && !in_vm && r > 0)
				for (j = 0; j < z->nmaps; j++)
					if (z->maps[j].addr == a[0])
						z->maps[j].addr = (uint64_t)r, z->maps[j].len = a[2];
			if (fork_mode && in_vm && (nr == 11 || nr == 25)) {
				forget_mappings(z, a[0]);
				if (nr == 25 && z->nmaps < 16 && r > 0)
					z->maps[z->nmaps].addr = (uint64_t)r, z->maps[z->nmaps++].len = a[2];
			}
			if (fork_mode && nr == 61 && r > 0) { /* a random wait4 reaped a child */
				int k = find_kid(z, r), st = -1;
				if (in_arena(z, a[1]) && in_arena(z, a[1] + 3))
					memcpy(&st, (void *)(uintptr_t)a[1], 4);
				if (k >= 0)
					settle(z, k, st);
				else {
					say(z, "wait4 reaped an unknown child (pid, 0, 0):", r, 0, 0);
					z->bad++;
				}
			}
		}
	}
}

int main(int argc, char **argv)
{
	unsigned long seed = 1, n = 100000;
	long forks = 0;
	int opt, j;
	uint64_t sum = 1469598103934665603UL;
	struct fz *z = &top;

	while ((opt = getopt(argc, argv, "s:n:f:c:v")) != -1) {
		if (opt == 's')
			seed = strtoul(optarg, 0, 0);
		else if (opt == 'n')
			n = strtoul(optarg, 0, 0);
		else if (opt == 'f')
			forks = strtol(optarg, 0, 0);
		else if (opt == 'c')
			child_calls = strtoul(optarg, 0, 0);
		else if (opt == 'v')
			verbose = 1;
		else
			forks = -1;
	}
	if (forks < 0 || forks > 100000 || child_calls < 1) {
		fprintf(stderr, "usage: syscall_fuzz [-s SEED] [-n N] [-f FORKS] [-c CHILD_CALLS] [-v]\n");
		return 2;
	}
	in_vm = raw(HC_PROBE, 0, 0, 0) == HC_MAGIC;
	fork_mode = forks > 0;
	z->arena = arena0;
	z->hist = hist0;
	z->rng = seed_state(seed);
	z->crng = seed_state(seed ^ 0xC0FFEE);
	z->forks_left = (int)forks;
	z->pid = raw(SYS_getpid, 0, 0, 0);
	for (j = 0; j < 3; j++)
		have_console[j] = raw(SYS_fstat, j, (long)&console[j], 0) == 0;
	if (raw(SYS_fcntl, 1, F_DUPFD, SAVED_FD) != SAVED_FD) {
		perror("syscall_fuzz: dup stdout");
		return 2;
	}
	ignore_sigpipe();
	if (fork_mode) {
		open_reports(z);
		if (!z->have_rep) {
			dprintf(SAVED_FD, "syscall_fuzz: cannot make the report pipe\n");
			return 2;
		}
	}

	fuzz(z, n);

	if (fork_mode) {
		int st;
		long r;
		finish(z);
		r = raw6(SYS_wait4, -1, (long)&st, WNOHANG, 0, 0, 0);
		if (r != -ECHILD) {
			say(z, "a child is left: wait4(-1, WNOHANG) returned", r, 0, 0);
			z->bad++;
		}
	}
	raw(SYS_fcntl, SAVED_FD, F_SETFL, 0);
	for (j = 0; j <= MAX_ERRNO; j++) {
		uint64_t v = z->hist[j] ? ((uint64_t)j << 40) ^ z->hist[j] : 0;
		int b;
		if (!v)
			continue;
		for (b = 0; b < 8; b++) {
			sum ^= (v >> (8 * b)) & 0xff;
			sum *= 1099511628211UL;
		}
	}
	dprintf(SAVED_FD, "seed=%lu calls=%lu ok=%lu errors=%lu skipped=%lu vm=%d hist=%016llx", seed,
		n + z->dcalls, z->ok + z->dok, z->errs + z->derrs, z->skipped + z->dskip, in_vm,
		(unsigned long long)sum);
	if (fork_mode)
		dprintf(SAVED_FD, " forks=%lu children_ok=%lu", z->forks, z->kids_ok);
	dprintf(SAVED_FD, "\nerrnos");
	for (j = 0; j <= MAX_ERRNO; j++)
		if (z->hist[j])
			dprintf(SAVED_FD, " %d:%llu", j, (unsigned long long)z->hist[j]);
	dprintf(SAVED_FD, "\n");
	if (fork_mode && (z->bad || z->kids_ok != z->forks)) {
		dprintf(SAVED_FD, "fork check: failed (%lu problems, %lu of %lu children as expected)\n",
			z->bad, z->kids_ok, z->forks);
		return 3;
	}
	return 0;
}
