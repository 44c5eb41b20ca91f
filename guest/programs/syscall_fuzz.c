/*
 * syscall_fuzz [-s SEED] [-n N] [-v]: issue N random syscalls with random
 * arguments and count the results.
 *
 * Syscall numbers come mostly from the set unifork supports (docs/syscalls.md),
 * some are random numbers 0..460 and, in the VM only, some are hypercalls
 * 0x1000..0x1010.  Arguments mix small ints, -1, huge values, random 64-bit
 * values, pointers into a local arena, just past it, misaligned, NULL,
 * unmapped addresses, fds 0..20 and mappings this program made.
 *
 * What would end the process, block for ever or fork is never issued (exit,
 * exit_group, fork/vfork/clone, execve, rt_sigreturn, pause; kill/tkill/tgkill
 * only with signal 0; wait4/waitid with WNOHANG; sleeps and futex waits get a
 * timeout below 1 ms; reads and writes only on non-blocking fds, never on the
 * console).  Lengths paired with a pointer into the arena are clamped so that
 * no syscall can write past it: there is no MMU in the VM.
 *
 * The VM is detected with the probe hypercall (0x1000 -> "unifork").  Natively
 * the fuzzer is conservative: only supported syscalls, no random numbers, no
 * MAP_FIXED, munmap/mremap/mprotect/madvise only of its own mappings, no
 * brk moves, no setrlimit/setpgid/setsid, no SET_FS, no signal handlers,
 * open only of /dev/null, /dev/zero, /dev/urandom and paths that do not exist,
 * read-only ioctls, affinity only of itself.
 *
 * Output: "seed=S calls=N ok=K errors=E skipped=X hist=CHECKSUM" and a line
 * "errnos E:COUNT ..." with every errno seen; exit status 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define HC_PROBE 0x1000
#define HC_MAGIC 0x756E69666F726BL
#define SAVED_FD 100
#define DATA_SIZE 4096
#define MAX_ERRNO 4095

static long raw6(long n, long a1, long a2, long a3, long a4, long a5, long a6)
{
	long ret;
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	register long r9 __asm__("r9") = a6;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

static long raw(long n, long a1, long a2, long a3)
{
	return raw6(n, a1, a2, a3, 0, 0, 0);
}

/* [slack 4096][data 4096][slack 8192]: iovecs live in the first slack,
 * "valid" pointers point into data, "past" pointers at its end; clamped
 * lengths keep every write inside the arena. */
static unsigned char arena[16384] __attribute__((aligned(4096)));
#define DATA (arena + 4096)
#define IOV ((struct iovec *)arena)

static uint64_t rng;
static int in_vm;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint64_t below(uint64_t n)
{
	return rnd() % n;
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

struct mapping { uint64_t addr, len; };
static struct mapping maps[16];
static int nmaps;

static uint64_t gen(enum cls *c)
{
	static const uint64_t huge[] = {
		0x7fffffffUL, 0x80000000UL, 0xffffffffUL, 0x7fffffffffffffffUL,
		0x8000000000000000UL, 0xfffffffffffff000UL, 1UL << 40, 0xffffffffffffffffUL - 15,
	};
	*c = (enum cls)below(NCLS);
	switch (*c) {
	case C_SMALL: return below(65);
	case C_MINUS1: return (uint64_t)-1;
	case C_HUGE: return huge[below(8)];
	case C_RANDOM: return rnd();
	case C_VALID: return (uint64_t)(uintptr_t)(DATA + (below(DATA_SIZE) & ~7UL));
	case C_PAST: return (uint64_t)(uintptr_t)(DATA + DATA_SIZE);
	case C_NULL: return 0;
	case C_UNMAPPED: return below(2) ? 0x10 : 0xbad00000000UL;
	case C_MISALIGNED: return (uint64_t)(uintptr_t)(DATA + (below(DATA_SIZE - 8) | 1));
	case C_FD: return below(21);
	case C_INT: return (uint32_t)rnd();
	case C_MAPPING:
		if (nmaps)
			return maps[below(nmaps)].addr + (below(4) ? 0 : below(8192));
		*c = C_SMALL;
		return below(65);
	default: return 0;
	}
}

static int in_arena(uint64_t p)
{
	return p >= (uint64_t)(uintptr_t)arena && p < (uint64_t)(uintptr_t)arena + sizeof(arena);
}

static int readable(enum cls c)
{
	return c == C_VALID || c == C_PAST || c == C_MISALIGNED || c == C_MAPPING;
}

/* keep a write of len bytes at ptr inside the arena (or inside a mapping natively) */
static void clamp(uint64_t ptr, uint64_t *len, uint64_t unit)
{
	if (in_arena(ptr) && *len * unit > DATA_SIZE)
		*len = below(DATA_SIZE / unit + 1);
	else if (!in_vm && !in_arena(ptr) && *len > 4096)
		*len = below(4097); /* natively: never large writes into our mappings */
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

static void put_timespec(uint64_t *arg, enum cls c)
{
	/* a sleep or wait timeout: at most 1 ms, or invalid (EINVAL/EFAULT) */
	long *ts;
	if (c == C_UNMAPPED || c == C_RANDOM || c == C_HUGE || c == C_MINUS1)
		return; /* EFAULT */
	if (!in_arena(*arg) || *arg + 16 > (uint64_t)(uintptr_t)(DATA + DATA_SIZE))
		*arg = (uint64_t)(uintptr_t)(DATA + 8 * below(DATA_SIZE / 8 - 2));
	ts = (long *)(uintptr_t)(*arg & ~7UL);
	*arg = (uint64_t)(uintptr_t)ts;
	switch (below(6)) {
	case 0: ts[0] = -1; ts[1] = 0; break;
	case 1: ts[0] = 0; ts[1] = 1000000000; break;
	case 2: ts[0] = 0; ts[1] = -5; break;
	default: ts[0] = 0; ts[1] = (long)below(1000000); break;
	}
}

static const char *const safe_paths[] = {
	"/dev/null", "/dev/zero", "/dev/urandom", "/nonexistent/x", "", "/dev/nothing",
};
static const char *const vm_paths[] = {
	"/", ".", "/dev", "/etc/passwd", "/dev/tty", "/proc/self/maps", "//dev//null",
	"/dev/null/", "../../dev/zero",
};

static void put_path(uint64_t *arg, enum cls c)
{
	char *p;
	if (!(c == C_VALID || c == C_MISALIGNED)) {
		if (!in_vm && c != C_NULL && c != C_UNMAPPED)
			*arg = (uint64_t)(uintptr_t)(DATA + below(DATA_SIZE - 64));
		else
			return;
	}
	p = (char *)(uintptr_t)*arg;
	if ((char *)p + 64 > (char *)DATA + DATA_SIZE)
		p = (char *)DATA + DATA_SIZE - 64, *arg = (uint64_t)(uintptr_t)p;
	if (in_vm && below(4) == 0) {
		int i, n = (int)below(63);
		for (i = 0; i < n; i++)
			p[i] = (char)(1 + below(255));
		p[n] = below(8) ? 0 : 'x'; /* sometimes unterminated in 64 bytes */
	} else if (in_vm && below(3) == 0) {
		strcpy(p, vm_paths[below(sizeof(vm_paths) / sizeof(vm_paths[0]))]);
	} else {
		strcpy(p, safe_paths[below(sizeof(safe_paths) / sizeof(safe_paths[0]))]);
	}
}

/* iovecs for readv/writev in the arena's first slack */
static void put_iov(uint64_t *iov, uint64_t *cnt, enum cls c, int console_ok)
{
	int i, n;
	if (!readable(c) || !in_arena(*iov)) {
		if (c != C_MAPPING)
			return; /* NULL, unmapped, random: EFAULT/EINVAL paths */
	}
	n = (int)below(9);
	for (i = 0; i < n; i++) {
		enum cls ec;
		uint64_t b = gen(&ec), l = gen(&ec);
		if (console_ok && readable(ec))
			b = 0xbad00000000UL;
		else if (readable(ec) && !in_arena(b))
			b = (uint64_t)(uintptr_t)(DATA + below(DATA_SIZE));
		if (in_arena(b) || !in_vm)
			l = below(257);
		IOV[i].iov_base = (void *)(uintptr_t)b;
		IOV[i].iov_len = l;
	}
	*iov = (uint64_t)(uintptr_t)IOV;
	if (below(8))
		*cnt = (uint64_t)n;
}

static void ignore_sigpipe(void)
{
	/* struct k_sigaction: handler, flags, restorer, mask */
	unsigned long act[4] = { (unsigned long)SIG_IGN, 0, 0, 0 };
	raw6(SYS_rt_sigaction, SIGPIPE, (long)act, 0, 8, 0, 0);
}

static int is_self_fd(uint64_t fd)
{
	return (int)fd == SAVED_FD;
}

/*
 * Make the call safe (or say it must be skipped: return 0).  Applies to
 * every number, whether drawn from the table or at random.
 */
static int sanitize(long nr, uint64_t *a, enum cls *c)
{
	int native = !in_vm;
	switch (nr) {
	case 56: case 57: case 58: case 59: case 60: case 231: case 15: case 34:
		return 0; /* clone, fork, vfork, execve, exit, exit_group, rt_sigreturn, pause */
	case 0: case 17: /* read, pread64 */
		if ((int)a[0] == 0)
			return 0;
		if (!data_fd((int)a[0]))
			return 0;
		clamp(a[1], &a[2], 1);
		return 1;
	case 1: case 18: /* write, pwrite64 */
		if (is_console((int)a[0]) == 1 && readable(c[1]))
			return 0;
		if (!data_fd((int)a[0]) && readable(c[1]))
			return 0;
		clamp(a[1], &a[2], 1);
		return 1;
	case 19: case 20: { /* readv, writev */
		int cons = is_console((int)a[0]) == 1;
		if (nr == 19 && (cons || (int)a[0] == 0))
			return 0;
		if (!cons && !data_fd((int)a[0]))
			return 0;
		put_iov(&a[1], &a[2], c[1], cons);
		if (cons && a[1] == (uint64_t)(uintptr_t)IOV)
			return in_vm; /* bases all invalid: EFAULT, no output */
		return 1;
	}
	case 2: /* open(path, flags, mode) */
		put_path(&a[0], c[0]);
		if (native)
			a[1] &= O_ACCMODE | O_NONBLOCK | O_CLOEXEC;
		return 1;
	case 257: /* openat(dirfd, path, flags, mode) */
		put_path(&a[1], c[1]);
		if (native)
			a[2] &= O_ACCMODE | O_NONBLOCK | O_CLOEXEC;
		return 1;
	case 4: case 6: case 21: /* stat, lstat, access */
		put_path(&a[0], c[0]);
		return 1;
	case 262: case 269: /* newfstatat, faccessat */
		put_path(&a[1], c[1]);
		return 1;
	case 3: /* close */
		return !is_self_fd(a[0]);
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
			a[1] = (uint64_t)ok[below(6)];
			if (a[1] == F_SETFL && is_console((int)a[0]))
				a[1] = F_GETFL;
		}
		return 1;
	case 16: /* ioctl */
		if (native) {
			static const unsigned long ok[] = { 0x5401 /* TCGETS */, 0x5413 /* TIOCGWINSZ */,
							    0x541B /* FIONREAD */, 0x5421 /* FIONBIO */ };
			a[1] = ok[below(4)];
			if (a[1] == 0x5421 && is_console((int)a[0]))
				a[1] = 0x541B;
		}
		if (in_arena(a[2]) || readable(c[2]))
			a[2] = (uint64_t)(uintptr_t)(DATA + 8 * below(DATA_SIZE / 8 - 16));
		return 1;
	case 79: /* getcwd */
		clamp(a[0], &a[1], 1);
		return 1;
	case 115: /* getgroups(size, list) */
		clamp(a[1], &a[0], 4);
		return 1;
	case 204: /* sched_getaffinity(pid, len, mask) */
		clamp(a[2], &a[1], 1);
		return 1;
	case 203: /* sched_setaffinity */
		if (native)
			a[0] = 0;
		return 1;
	case 318: /* getrandom */
		clamp(a[0], &a[1], 1);
		if (native)
			a[2] = (a[2] & 3) | 1; /* GRND_NONBLOCK */
		return 1;
	case 13: /* rt_sigaction */
		if (native)
			a[1] = 0; /* never install a handler natively */
		clamp(a[2], &a[3], 1);
		return 1;
	case 14: /* rt_sigprocmask */
		clamp(a[2], &a[3], 1);
		return 1;
	case 127: /* rt_sigpending */
		clamp(a[0], &a[1], 1);
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
		a[2] |= 1; /* WNOHANG */
		return 1;
	case 35: /* nanosleep */
		put_timespec(&a[0], c[0]);
		return 1;
	case 230: /* clock_nanosleep(clock, flags, req, rem) */
		if (native || below(2))
			a[0] = below(2) ? 0 : 1; /* REALTIME, MONOTONIC */
		put_timespec(&a[2], c[2]);
		return 1;
	case 202: { /* futex(uaddr, op, val, timeout, uaddr2, val3) */
		int op = (int)a[1] & 127;
		if (native) {
			static const int ok[] = { 0, 1, 3, 4, 5, 9, 10 };
			op = ok[below(7)];
			a[1] = (uint64_t)(op | (below(2) ? 128 : 0) | (below(4) ? 0 : 256));
			if (!in_arena(a[0]))
				a[0] = below(2) ? 0 : (uint64_t)(uintptr_t)(DATA + 4 * below(DATA_SIZE / 4));
			if (!in_arena(a[4]))
				a[4] = below(2) ? 0x10 : (uint64_t)(uintptr_t)(DATA + 4 * below(DATA_SIZE / 4));
		}
		if (op == 0 || op == 9 || op == 6 || op == 11 || op == 13)
			put_timespec(&a[3], c[3] == C_NULL ? C_VALID : c[3]);
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
		if (!nmaps)
			return 0;
		i = (int)below(nmaps);
		a[0] = maps[i].addr;
		if (nr == 11) {
			a[1] = maps[i].len;
			maps[i] = maps[--nmaps];
		} else if (nr == 10) {
			a[1] = below(maps[i].len + 1);
		} else if (nr == 28) {
			static const int adv[] = { 0, 1, 2, 3, 4, 8, 10, 11, 14, 15 };
			a[1] = below(maps[i].len + 1);
			a[2] = adv[below(10)];
		} else {
			a[1] = maps[i].len;
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
			a[0] = below(2) ? 0x1003 : 0x1004; /* ARCH_GET_FS, ARCH_GET_GS */
			if (!in_arena(a[1]))
				a[1] = (uint64_t)(uintptr_t)(DATA + 8 * below(DATA_SIZE / 8));
		}
		return 1;
	case 109: case 112: case 160: /* setpgid, setsid, setrlimit */
		return in_vm;
	case 302: /* prlimit64(pid, res, new, old) */
		if (native)
			a[2] = 0;
		return 1;
	case 218: /* set_tid_address */
		if (native && !in_arena(a[0]))
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

static uint64_t hist[MAX_ERRNO + 1];

int main(int argc, char **argv)
{
	unsigned long seed = 1, n = 100000, i, ok = 0, errs = 0, skipped = 0;
	int verbose = 0, opt, j;
	uint64_t sum = 1469598103934665603UL;
	long fsbase = 0;

	while ((opt = getopt(argc, argv, "s:n:v")) != -1) {
		if (opt == 's')
			seed = strtoul(optarg, 0, 0);
		else if (opt == 'n')
			n = strtoul(optarg, 0, 0);
		else if (opt == 'v')
			verbose = 1;
		else {
			fprintf(stderr, "usage: syscall_fuzz [-s SEED] [-n N] [-v]\n");
			return 2;
		}
	}
	in_vm = raw(HC_PROBE, 0, 0, 0) == HC_MAGIC;
	rng = seed * 0x9E3779B97F4A7C15UL + 0x632BE59BD9B4E019UL;
	if (!rng)
		rng = 1;
	for (j = 0; j < 3; j++)
		have_console[j] = raw(SYS_fstat, j, (long)&console[j], 0) == 0;
	if (raw(SYS_fcntl, 1, F_DUPFD, SAVED_FD) != SAVED_FD) {
		perror("syscall_fuzz: dup stdout");
		return 2;
	}
	ignore_sigpipe();
	raw(SYS_arch_prctl, 0x1003, (long)&fsbase, 0);

	for (i = 0; i < n;) {
		uint64_t a[6];
		enum cls c[6];
		long nr, r;
		uint64_t pick = below(100);

		if (pick < 85)
			nr = supported[below(NSUPPORTED)];
		else if (pick < 95 || !in_vm)
			nr = (long)below(461);
		else
			nr = 0x1000 + (long)below(0x11);
		for (j = 0; j < 6; j++)
			a[j] = gen(&c[j]);
		if (!sanitize(nr, a, c)) {
			skipped++;
			continue;
		}
		if (verbose)
			dprintf(SAVED_FD, "%lu: %ld(%#lx, %#lx, %#lx, %#lx, %#lx, %#lx)\n", i, nr,
				(unsigned long)a[0], (unsigned long)a[1], (unsigned long)a[2],
				(unsigned long)a[3], (unsigned long)a[4], (unsigned long)a[5]);
		r = raw6(nr, (long)a[0], (long)a[1], (long)a[2], (long)a[3], (long)a[4], (long)a[5]);
		if (nr == 158 && (a[0] == 0x1002 || a[0] == 0x1001)) /* SET_FS/GS: put TLS back */
			raw(SYS_arch_prctl, 0x1002, fsbase, 0);
		if (nr == 13)
			ignore_sigpipe();
		i++;
		if (r < 0 && r >= -MAX_ERRNO) {
			errs++;
			hist[-r]++;
		} else {
			ok++;
			if (nr == 9 && nmaps < 16 && r > 0)
				maps[nmaps].addr = (uint64_t)r, maps[nmaps++].len = a[1];
			if (nr == 25 && !in_vm && r > 0)
				for (j = 0; j < nmaps; j++)
					if (maps[j].addr == a[0])
						maps[j].addr = (uint64_t)r, maps[j].len = a[2];
		}
	}

	raw(SYS_fcntl, SAVED_FD, F_SETFL, 0);
	for (j = 0; j <= MAX_ERRNO; j++) {
		uint64_t v = hist[j] ? ((uint64_t)j << 40) ^ hist[j] : 0;
		int b;
		if (!v)
			continue;
		for (b = 0; b < 8; b++) {
			sum ^= (v >> (8 * b)) & 0xff;
			sum *= 1099511628211UL;
		}
	}
	dprintf(SAVED_FD, "seed=%lu calls=%lu ok=%lu errors=%lu skipped=%lu vm=%d hist=%016llx\n",
		seed, n, ok, errs, skipped, in_vm, (unsigned long long)sum);
	dprintf(SAVED_FD, "errnos");
	for (j = 0; j <= MAX_ERRNO; j++)
		if (hist[j])
			dprintf(SAVED_FD, " %d:%llu", j, (unsigned long long)hist[j]);
	dprintf(SAVED_FD, "\n");
	return 0;
}
