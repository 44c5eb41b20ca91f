/*
 * signals — guest signal handlers, masks, queues and job control (issue 15).
 *
 * `signals CASE` runs one case and prints what it saw; the output is the same
 * natively and in every fork mode (tests/test_signals.py gives each case's
 * expected lines).  Cases:
 *   handler    SA_SIGINFO handler runs and returns; siginfo; sa_mask; SA_RESETHAND;
 *              x87/SSE registers intact across a handler
 *   restart    SA_RESTART restarts a blocking pipe read; without it, EINTR
 *              (alarm() and setitimer(ITIMER_REAL) interrupt the read)
 *   sigsuspend sigsuspend woken by SIGCHLD from a child that exits
 *   sigchld    a SIGCHLD handler does not make waitpid fail; SA_NOCLDSTOP; SA_NOCLDWAIT
 *   nodefer    nested handlers with SA_NODEFER; without it, the second waits
 *   altstack   SIGSEGV handler on a sigaltstack that siglongjmps out; a handler
 *              returning to the faulting store re-faults
 *   ucontext   a SIGSEGV handler reads and edits the interrupted state in its
 *              ucontext (rip past the store, rax, xmm0 in the fxsave image):
 *              rt_sigreturn resumes with exactly what it wrote
 *   rtqueue    10 queued real-time signals delivered in order with their values;
 *              standard signals coalesce; sigpending; sigtimedwait
 *   stopcont   SIGSTOP/SIGCONT seen by waitpid with WUNTRACED/WCONTINUED
 *   killspin   a parent kills a child that spins without syscalls
 *   jobctl     the console as a controlling terminal (run with a tty as stdin):
 *              tcgetpgrp/tcsetpgrp, SIGTTOU/SIGTTIN for background groups (a stop,
 *              EIO when ignored, EINTR after a handler), an orphaned group, setsid;
 *              without a tty: ENOTTY
 *   sigqueuefork sigqueue values and kill's si_pid between a parent and its child
 *              (across VMs in VM-clone mode)
 *   timers     timer_create: SIGEV_SIGNAL to a handler and to sigwaitinfo (si_value,
 *              SI_TIMER), TIMER_ABSTIME, periodic with overruns, SIGEV_NONE, a NULL
 *              sigevent, bad ids and values, a fork child without the parent's timers
 *   core       RLIMIT_CORE 0: children killed by "core" signals, no WCOREDUMP, CLD_KILLED
 *   coredump   RLIMIT_CORE raised: WCOREDUMP and CLD_DUMPED (natively: a core file
 *              is written to the working directory with core_pattern "core")
 *   spinhandler a child spinning on a flag without syscalls gets its SIGUSR1
 *              handler run (the flag set) at an instruction boundary, and exits
 *   piperestart a child signals its parent blocked in read() on a pipe they share;
 *              the SA_RESTART handler runs and the read goes on to get the data
 *   badhandler a handler address that is not mapped: SIGSEGV
 *   badframe   rt_sigreturn on a frame that cannot be read, or garbage: SIGSEGV
 *   storm      100000 kills to a child with a handler; it still exits cleanly
 *   flood      a child kills its parent in a loop while the parent computes without
 *              syscalls: the parent's handler runs and its work still gets done
 *   stopread   a read blocked when SIGSTOP comes, data written while stopped: on
 *              SIGCONT its handler (no SA_RESTART) runs first, the read is EINTR
 *   pingpong   N SIGUSR1 round trips between a parent and its child (handlers, sigsuspend);
 *              -t prints the one-way kill-to-handler latency (across VMs or hosts)
 *   roundtrip  N self-signals (kill, handler, sigreturn); prints the mean (-t)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define PROG "signals"

#include "guest_common.h"

static void on(int sig, void (*fn)(int, siginfo_t *, void *), int flags, const sigset_t *mask)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = fn;
	sa.sa_flags = flags | SA_SIGINFO;
	if (mask)
		sa.sa_mask = *mask;
	else
		sigemptyset(&sa.sa_mask);
	if (sigaction(sig, &sa, NULL))
		die("sigaction(%d): %s", sig, strerror(errno));
}

static const char *status_str(int st)
{
	static char buf[64];
	if (WIFEXITED(st))
		snprintf(buf, sizeof buf, "exited %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, sizeof buf, "killed by %s", strsignal(WTERMSIG(st)));
	else if (WIFSTOPPED(st))
		snprintf(buf, sizeof buf, "stopped by %s", strsignal(WSTOPSIG(st)));
	else if (WIFCONTINUED(st))
		snprintf(buf, sizeof buf, "continued");
	else
		snprintf(buf, sizeof buf, "status %#x", st);
	return buf;
}

/* -- handler ----------------------------------------------------------------- */
static volatile sig_atomic_t got_sig, got_code, got_pid, order_len;
static volatile int order[16];
static volatile double fp_in_handler;

static void h_info(int sig, siginfo_t *si, void *uc)
{
	volatile double x = 3.0;
	got_sig = sig;
	got_code = si->si_code;
	got_pid = si->si_pid;
	for (int i = 0; i < 10; i++)
		x = x * 1.5 + 0.25; /* clobbers x87/SSE registers */
	fp_in_handler = x;
	(void)uc;
}

static void h_order(int sig, siginfo_t *si, void *uc)
{
	(void)si, (void)uc;
	order[order_len++] = sig;
	if (sig == SIGUSR1) {
		raise(SIGUSR2); /* blocked by sa_mask: runs after this handler */
		order[order_len++] = -sig;
	}
}

static int case_handler(void)
{
	volatile double a = 1.0 / 3.0, b = 0;
	on(SIGUSR1, h_info, 0, NULL);
	raise(SIGUSR1);
	b = a * 3.0;
	printf("raise: handler ran: signo=%s code=%s pid=%s\n", got_sig == SIGUSR1 ? "SIGUSR1" : "?",
	       got_code == SI_TKILL ? "SI_TKILL" : "?", got_pid == getpid() ? "self" : "?");
	printf("fp state intact after the handler: %s\n", b == 1.0 && fp_in_handler > 100 ? "yes" : "no");
	got_sig = 0;
	kill(getpid(), SIGUSR1);
	printf("kill: handler ran: code=%s\n", got_sig == SIGUSR1 && got_code == SI_USER ? "SI_USER" : "?");

	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	on(SIGUSR1, h_order, 0, &m);
	on(SIGUSR2, h_order, 0, NULL);
	raise(SIGUSR1);
	printf("sa_mask order:");
	for (int i = 0; i < order_len; i++)
		printf(" %s%s", order[i] < 0 ? "end-" : "", order[i] == SIGUSR1 || order[i] == -SIGUSR1 ? "USR1" : "USR2");
	printf("\n");

	on(SIGUSR1, h_info, SA_RESETHAND, NULL);
	got_sig = 0;
	raise(SIGUSR1);
	struct sigaction old;
	sigaction(SIGUSR1, NULL, &old);
	printf("SA_RESETHAND: ran once, now %s\n", got_sig == SIGUSR1 && old.sa_handler == SIG_DFL ? "SIG_DFL" : "?");
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	printf("mask after handlers: %s\n", sigismember(&cur, SIGUSR1) || sigismember(&cur, SIGUSR2) ? "dirty" : "restored");
	return 0;
}

/* -- restart ----------------------------------------------------------------- */
static int wake_fd = -1;
static volatile sig_atomic_t alarms;

static void h_alarm(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	alarms++;
	if (wake_fd >= 0)
		(void)write(wake_fd, "x", 1);
}

static int case_restart(void)
{
	int p[2];
	char c = 0;
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	wake_fd = p[1];
	on(SIGALRM, h_alarm, SA_RESTART, NULL);
	alarm(1);
	ssize_t n = read(p[0], &c, 1);
	printf("SA_RESTART, alarm(1): read returned %zd '%c' after %d handler run(s)\n", n, n == 1 ? c : '?', (int)alarms);

	wake_fd = -1;
	alarms = 0;
	on(SIGALRM, h_alarm, 0, NULL);
	struct itimerval it = {{0, 0}, {0, 100000}};
	setitimer(ITIMER_REAL, &it, NULL);
	n = read(p[0], &c, 1);
	printf("no SA_RESTART, setitimer(100 ms): read returned %zd errno=%s after %d handler run(s)\n", n,
	       n < 0 && errno == EINTR ? "EINTR" : "?", (int)alarms);
	printf("alarm(0) with nothing armed: %u\n", alarm(0));
	alarm(100);
	unsigned left = alarm(0);
	printf("alarm(100) then alarm(0): %s\n", left >= 99 && left <= 100 ? "about 100 s left" : "?");
	return 0;
}

/* -- sigsuspend ---------------------------------------------------------------- */
static volatile sig_atomic_t chld_pid, chld_code, chld_status;

static void h_chld(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	chld_pid = si->si_pid;
	chld_code = si->si_code;
	chld_status = si->si_status;
}

static int case_sigsuspend(void)
{
	sigset_t block, empty, cur;
	sigemptyset(&block);
	sigaddset(&block, SIGCHLD);
	sigprocmask(SIG_BLOCK, &block, NULL);
	on(SIGCHLD, h_chld, 0, NULL);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0)
		_exit(7);
	sigemptyset(&empty);
	int r = sigsuspend(&empty);
	int e = errno;
	printf("sigsuspend returned %d errno=%s\n", r, e == EINTR ? "EINTR" : "?");
	printf("SIGCHLD: pid=%s code=%s status=%d\n", chld_pid == pid ? "child" : "?",
	       chld_code == CLD_EXITED ? "CLD_EXITED" : "?", (int)chld_status);
	sigprocmask(SIG_BLOCK, NULL, &cur);
	printf("mask restored: %s\n", sigismember(&cur, SIGCHLD) ? "SIGCHLD blocked again" : "?");
	int st;
	if (waitpid(pid, &st, 0) != pid)
		die("waitpid: %s", strerror(errno));
	printf("child %s\n", status_str(st));
	return 0;
}

/* -- sigchld ----------------------------------------------------------------- */
static volatile sig_atomic_t chld_runs;

static void h_count(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	chld_runs++;
}

static pid_t fork_pauser(void)
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		for (;;)
			pause();
	}
	return pid;
}

static int job_control_runs(int flags)
{
	int st;
	chld_runs = 0;
	on(SIGCHLD, h_count, flags, NULL);
	pid_t pid = fork_pauser();
	kill(pid, SIGSTOP);
	waitpid(pid, &st, WUNTRACED);
	kill(pid, SIGCONT);
	waitpid(pid, &st, WCONTINUED);
	kill(pid, SIGKILL);
	waitpid(pid, &st, 0);
	return chld_runs;
}

static int case_sigchld(void)
{
	int st;
	on(SIGCHLD, h_count, 0, NULL);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0)
		_exit(3);
	pid_t r = waitpid(pid, &st, 0);
	printf("waitpid with a SIGCHLD handler: %s, %s, handler ran %d time(s)\n",
	       r == pid ? "returned the child" : strerror(errno), status_str(st), (int)chld_runs);
	int runs3 = job_control_runs(0); /* the last two may coalesce: one pending SIGCHLD */
	printf("stop, continue, kill: SIGCHLD handled %s\n", runs3 == 2 || runs3 == 3 ? "2 or 3 times" : "?");
	printf("the same with SA_NOCLDSTOP: %d time(s)\n", job_control_runs(SA_NOCLDSTOP));
	on(SIGCHLD, h_count, SA_NOCLDWAIT, NULL);
	chld_runs = 0;
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0)
		_exit(4);
	r = wait(&st);
	printf("SA_NOCLDWAIT: wait returned %d errno=%s, handler ran %d time(s)\n", (int)r,
	       r < 0 && errno == ECHILD ? "ECHILD" : "?", (int)chld_runs);
	signal(SIGCHLD, SIG_IGN);
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0)
		_exit(5);
	r = wait(&st);
	printf("SIGCHLD ignored: wait returned %d errno=%s\n", (int)r, r < 0 && errno == ECHILD ? "ECHILD" : "?");
	return 0;
}

/* -- nodefer ----------------------------------------------------------------- */
static volatile sig_atomic_t depth, max_depth, runs;

static void h_nest(int sig, siginfo_t *si, void *uc)
{
	(void)si, (void)uc;
	depth++;
	runs++;
	if (depth > max_depth)
		max_depth = depth;
	if (runs < 3)
		raise(sig);
	depth--;
}

static int case_nodefer(void)
{
	on(SIGUSR1, h_nest, SA_NODEFER, NULL);
	raise(SIGUSR1);
	printf("SA_NODEFER: %d runs, nested %d deep\n", (int)runs, (int)max_depth);
	runs = max_depth = 0;
	on(SIGUSR1, h_nest, 0, NULL);
	raise(SIGUSR1);
	printf("without SA_NODEFER: %d runs, nested %d deep\n", (int)runs, (int)max_depth);
	return 0;
}

/* -- altstack ---------------------------------------------------------------- */
static sigjmp_buf jb;
static char altstack[65536] __attribute__((aligned(16)));
static volatile sig_atomic_t seg_on_alt, seg_code;
static volatile uintptr_t seg_addr;

static void h_segv_jump(int sig, siginfo_t *si, void *uc)
{
	volatile char here;
	(void)sig, (void)uc;
	seg_on_alt = (char *)&here >= altstack && (char *)&here < altstack + sizeof altstack;
	seg_code = si->si_code;
	seg_addr = (uintptr_t)si->si_addr;
	siglongjmp(jb, 1);
}

static int refault_fd = -1;
static volatile sig_atomic_t refaults;

static void h_segv_return(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	(void)write(refault_fd, "f", 1);
	if (++refaults == 3)
		signal(SIGSEGV, SIG_DFL);
}

static int case_altstack(void)
{
	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
	if (sigaltstack(&ss, NULL))
		die("sigaltstack: %s", strerror(errno));
	on(SIGSEGV, h_segv_jump, SA_ONSTACK, NULL);
	if (sigsetjmp(jb, 1) == 0) {
		*(volatile int *)0 = 1;
		printf("the store did not fault\n");
	} else {
		printf("SIGSEGV: on the alternate stack: %s, code=%s addr=%#lx, longjmp out ok\n",
		       seg_on_alt ? "yes" : "no", seg_code == SEGV_MAPERR ? "SEGV_MAPERR" : "?",
		       (unsigned long)seg_addr);
	}
	stack_t old;
	sigaltstack(NULL, &old);
	printf("sigaltstack: %s, size %zu\n", old.ss_flags == 0 ? "set, not on it" : "?", old.ss_size);

	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		close(p[0]);
		refault_fd = p[1];
		on(SIGSEGV, h_segv_return, 0, NULL);
		*(volatile int *)8 = 1; /* the handler returns here: it faults again */
		_exit(0);
	}
	close(p[1]);
	char buf[16];
	int n = 0;
	ssize_t r;
	while ((r = read(p[0], buf, sizeof buf)) > 0)
		n += r;
	int st;
	waitpid(pid, &st, 0);
	printf("handler returning to the fault: %d handler runs, then %s\n", n, status_str(st));
	return 0;
}

/* -- ucontext ----------------------------------------------------------------- */
static volatile unsigned long uc_seen_xmm, uc_seen_rax, uc_seen_mask;

static void h_edit(int sig, siginfo_t *si, void *ucv)
{
	ucontext_t *uc = ucv;
	(void)sig, (void)si;
	uc_seen_rax = uc->uc_mcontext.gregs[REG_RAX];
	memcpy((void *)&uc_seen_xmm, &uc->uc_mcontext.fpregs->_xmm[0], 8);
	uc_seen_mask = sigismember(&uc->uc_sigmask, SIGUSR2);
	uc->uc_mcontext.gregs[REG_RIP] += 11; /* past movl $1, 0 */
	uc->uc_mcontext.gregs[REG_RAX] = 4242;
	unsigned long v = 0x1122334455667788UL;
	memcpy(&uc->uc_mcontext.fpregs->_xmm[0], &v, 8);
	sigaddset(&uc->uc_sigmask, SIGUSR2); /* the mask rt_sigreturn installs */
}

static int case_ucontext(void)
{
	unsigned long rax_after, xmm_after, in = 0x0102030405060708UL;
	sigset_t cur;
	on(SIGSEGV, h_edit, 0, NULL);
	__asm__ volatile("movq %2, %%xmm0\n\t"
			 "mov $77, %%eax\n\t"
			 ".byte 0xc7, 0x04, 0x25, 0, 0, 0, 0, 1, 0, 0, 0\n\t" /* movl $1, 0 */
			 "mov %%rax, %0\n\t"
			 "movq %%xmm0, %1"
			 : "=r"(rax_after), "=r"(xmm_after)
			 : "r"(in)
			 : "rax", "xmm0", "memory");
	sigprocmask(SIG_BLOCK, NULL, &cur);
	printf("handler saw rax=%lu xmm0=%#lx SIGUSR2 in uc_sigmask=%lu\n", uc_seen_rax, uc_seen_xmm,
	       uc_seen_mask);
	printf("after rt_sigreturn: rax=%lu xmm0=%#lx SIGUSR2 blocked=%d\n", rax_after, xmm_after,
	       sigismember(&cur, SIGUSR2));
	return 0;
}

/* -- rtqueue ----------------------------------------------------------------- */
static volatile int rt_vals[16], rt_n, usr1_n;

static void h_rt(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig == SIGUSR1)
		usr1_n++;
	else if (rt_n < 16)
		rt_vals[rt_n++] = si->si_value.sival_int;
}

static int case_rtqueue(void)
{
	sigset_t m, pend;
	sigemptyset(&m);
	sigaddset(&m, SIGRTMIN);
	sigaddset(&m, SIGUSR1);
	sigprocmask(SIG_BLOCK, &m, NULL);
	on(SIGRTMIN, h_rt, 0, NULL);
	on(SIGUSR1, h_rt, 0, NULL);
	for (int i = 0; i < 10; i++) {
		union sigval v = {.sival_int = 100 + i};
		if (sigqueue(getpid(), SIGRTMIN, v))
			die("sigqueue: %s", strerror(errno));
	}
	for (int i = 0; i < 3; i++)
		kill(getpid(), SIGUSR1);
	sigpending(&pend);
	printf("pending: SIGRTMIN %s, SIGUSR1 %s\n", sigismember(&pend, SIGRTMIN) ? "yes" : "no",
	       sigismember(&pend, SIGUSR1) ? "yes" : "no");
	sigprocmask(SIG_UNBLOCK, &m, NULL);
	printf("real-time values in order:");
	for (int i = 0; i < rt_n; i++)
		printf(" %d", rt_vals[i]);
	printf("\nSIGUSR1 sent 3 times, handled %d time(s)\n", usr1_n);

	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	sigprocmask(SIG_BLOCK, &m, NULL);
	raise(SIGUSR2);
	siginfo_t si;
	int s = sigwaitinfo(&m, &si);
	printf("sigwaitinfo: %s code=%s\n", s == SIGUSR2 ? "SIGUSR2" : "?", si.si_code == SI_TKILL ? "SI_TKILL" : "?");
	struct timespec ts = {0, 50 * 1000 * 1000};
	s = sigtimedwait(&m, &si, &ts);
	printf("sigtimedwait with nothing pending: %d errno=%s\n", s, errno == EAGAIN ? "EAGAIN" : "?");
	return 0;
}

/* -- stopcont ------------------------------------------------------------------ */
static int case_stopcont(void)
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		for (;;)
			pause();
	}
	int st;
	kill(pid, SIGSTOP);
	if (waitpid(pid, &st, WUNTRACED) != pid)
		die("waitpid(WUNTRACED): %s", strerror(errno));
	printf("WUNTRACED: %s\n", status_str(st));
	printf("WNOHANG|WUNTRACED again: %d\n", (int)waitpid(pid, &st, WNOHANG | WUNTRACED));
	kill(pid, SIGCONT);
	if (waitpid(pid, &st, WCONTINUED) != pid)
		die("waitpid(WCONTINUED): %s", strerror(errno));
	printf("WCONTINUED: %s\n", status_str(st));
	kill(pid, SIGTERM);
	waitpid(pid, &st, 0);
	printf("then SIGTERM: %s\n", status_str(st));
	return 0;
}

/* -- killspin ------------------------------------------------------------------ */
static int case_killspin(void)
{
	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		volatile unsigned long x = 0;
		(void)write(p[1], "s", 1);
		for (;;)
			x++;
	}
	char c;
	if (read(p[0], &c, 1) != 1)
		die("read: %s", strerror(errno));
	kill(pid, SIGKILL);
	int st;
	waitpid(pid, &st, 0);
	printf("spinning child: %s\n", status_str(st));
	return 0;
}

/* -- core, coredump -------------------------------------------------------------- */
/* A child that dies of a signal whose default action is "core": abort(), a store
 * to address 0, a division by zero, SIGQUIT from itself, SIGQUIT from the parent
 * while it sleeps, and SIGTERM (terminate only) for contrast. */
static void core_child(int how, int ready)
{
	volatile int zero = 0;
	switch (how) {
	case 0:
		abort();
	case 1:
		*(volatile int *)(uintptr_t)zero = 1;
		break;
	case 2: {
		int q = 1, d = zero;
		__asm__ volatile("cltd; idivl %1" : "+a"(q) : "r"(d) : "edx"); /* #DE: SIGFPE */
		zero = q;
		break;
	}
	case 3:
		raise(SIGQUIT);
		break;
	case 4:
		(void)write(ready, "r", 1);
		for (;;)
			pause();
	default:
		raise(SIGTERM);
	}
	_exit(0);
}

static int core_run(int limit)
{
	static const char *what[] = {"abort()", "store to 0", "divide by 0", "raise(SIGQUIT)",
				     "kill(SIGQUIT) while in pause()", "raise(SIGTERM)"};
	struct rlimit rl;
	if (getrlimit(RLIMIT_CORE, &rl))
		die("getrlimit: %s", strerror(errno));
	rl.rlim_cur = limit ? rl.rlim_max : 0;
	if (setrlimit(RLIMIT_CORE, &rl))
		die("setrlimit: %s", strerror(errno));
	if (limit && rl.rlim_cur < 4096)
		die("RLIMIT_CORE hard limit %ld is too low", (long)rl.rlim_max);
	printf("RLIMIT_CORE soft limit %s\n", limit ? "raised to the hard limit" : "0");
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	for (int how = 0; how < 6; how++) {
		int p[2];
		if (pipe(p))
			die("pipe: %s", strerror(errno));
		fflush(stdout);
		pid_t pid = fork();
		if (pid < 0)
			die("fork: %s", strerror(errno));
		if (pid == 0)
			core_child(how, p[1]);
		close(p[1]);
		if (how == 4) {
			char c;
			if (read(p[0], &c, 1) != 1)
				die("read: %s", strerror(errno));
			kill(pid, SIGQUIT);
		}
		close(p[0]);
		siginfo_t si;
		if (sigwaitinfo(&chld, &si) != SIGCHLD)
			die("sigwaitinfo: %s", strerror(errno));
		int st;
		if (waitpid(pid, &st, 0) != pid)
			die("waitpid: %s", strerror(errno));
		printf("%s: %s, WCOREDUMP=%d, SIGCHLD %s status=%s\n", what[how], status_str(st),
		       WIFSIGNALED(st) && WCOREDUMP(st) ? 1 : 0,
		       si.si_code == CLD_DUMPED   ? "CLD_DUMPED"
		       : si.si_code == CLD_KILLED ? "CLD_KILLED"
						  : "?",
		       si.si_status == WTERMSIG(st) ? "WTERMSIG" : "?");
	}
	return 0;
}

/* -- timers ---------------------------------------------------------------------- */
static volatile sig_atomic_t tm_runs, tm_code, tm_value, tm_overrun;

static void h_timer(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	tm_runs++;
	tm_code = si->si_code;
	tm_value = si->si_value.sival_int;
	tm_overrun = si->si_overrun;
}

static timer_t new_timer(clockid_t clock, int notify, int sig, int value)
{
	struct sigevent ev;
	memset(&ev, 0, sizeof ev);
	ev.sigev_notify = notify;
	ev.sigev_signo = sig;
	ev.sigev_value.sival_int = value;
	timer_t t;
	if (timer_create(clock, &ev, &t))
		die("timer_create: %s", strerror(errno));
	return t;
}

static int arm(timer_t t, int flags, long value_ns, long interval_ns, struct itimerspec *old)
{
	struct itimerspec its = {{interval_ns / 1000000000, interval_ns % 1000000000},
				 {value_ns / 1000000000, value_ns % 1000000000}};
	return timer_settime(t, flags, &its, old);
}

static const char *err_str(int rc)
{
	static char buf[32];
	snprintf(buf, sizeof buf, "%d errno=%s", rc, rc ? (errno == EINVAL ? "EINVAL" : strerror(errno)) : "0");
	return buf;
}

static int case_timers(void)
{
	/* SIGEV_SIGNAL to a handler, one-shot on CLOCK_MONOTONIC */
	sigset_t none, usr1, usr2, alrm;
	sigemptyset(&none);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	on(SIGUSR1, h_timer, 0, NULL);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
	timer_t t1 = new_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, 0x1234);
	arm(t1, 0, 20000000, 0, NULL);
	while (!tm_runs)
		sigsuspend(&none);
	printf("SIGEV_SIGNAL: handler ran %d time(s), code=%s value=%#x overrun=%d\n", (int)tm_runs,
	       tm_code == SI_TIMER ? "SI_TIMER" : "?", (int)tm_value, (int)tm_overrun);
	struct itimerspec cur;
	timer_gettime(t1, &cur);
	printf("one-shot after expiry: %s\n",
	       cur.it_value.tv_sec || cur.it_value.tv_nsec || cur.it_interval.tv_sec ? "armed" : "disarmed");

	/* CLOCK_REALTIME with TIMER_ABSTIME, taken by sigwaitinfo */
	sigprocmask(SIG_BLOCK, &usr2, NULL);
	timer_t t2 = new_timer(CLOCK_REALTIME, SIGEV_SIGNAL, SIGUSR2, 7);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	long abs_ns = now.tv_nsec + 30000000;
	struct itimerspec at = {{0, 0}, {now.tv_sec + abs_ns / 1000000000, abs_ns % 1000000000}};
	timer_settime(t2, TIMER_ABSTIME, &at, NULL);
	siginfo_t si;
	int got = sigwaitinfo(&usr2, &si);
	printf("TIMER_ABSTIME on CLOCK_REALTIME: sigwaitinfo got %s code=%s value=%d\n",
	       got == SIGUSR2 ? "SIGUSR2" : "?", si.si_code == SI_TIMER ? "SI_TIMER" : "?",
	       si.si_value.sival_int);

	/* periodic: three expiries seen, then overruns while the signal is pending */
	arm(t2, 0, 10000000, 10000000, NULL);
	int seen = 0;
	for (int i = 0; i < 3; i++)
		seen += sigwaitinfo(&usr2, &si) == SIGUSR2;
	printf("periodic 10 ms: %d expiries taken one by one\n", seen);
	struct timespec nap = {0, 80000000};
	while (nanosleep(&nap, &nap))
		;
	sigwaitinfo(&usr2, &si);
	int ov = timer_getoverrun(t2);
	printf("blocked for 80 ms: one signal, si_overrun > 0: %s, timer_getoverrun = si_overrun: %s\n",
	       si.si_overrun > 0 ? "yes" : "no", ov == si.si_overrun ? "yes" : "no");
	struct itimerspec old;
	arm(t2, 0, 0, 0, &old);
	printf("disarm: old value had a 10 ms period: %s\n",
	       old.it_interval.tv_sec == 0 && old.it_interval.tv_nsec == 10000000 ? "yes" : "no");
	timer_delete(t2);
	sigtimedwait(&usr2, &si, &(struct timespec){0, 0}); /* a last expiry, if it came */

	/* SIGEV_NONE: nothing is sent, the time left can be read */
	timer_t t3 = new_timer(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0);
	arm(t3, 0, 10000000000L, 0, NULL);
	timer_gettime(t3, &cur);
	printf("SIGEV_NONE: armed, about %ld s left\n", (long)(cur.it_value.tv_sec + (cur.it_value.tv_nsec > 500000000)));
	arm(t3, 0, 1000000, 0, NULL);
	nap = (struct timespec){0, 20000000};
	while (nanosleep(&nap, &nap))
		;
	sigset_t pend;
	sigpending(&pend);
	timer_gettime(t3, &cur);
	printf("SIGEV_NONE after expiry: %s, nothing pending: %s\n",
	       cur.it_value.tv_sec || cur.it_value.tv_nsec ? "armed" : "disarmed",
	       sigisemptyset(&pend) ? "yes" : "no");
	timer_delete(t3);

	/* no sigevent: SIGALRM with the timer's id as its value */
	sigprocmask(SIG_BLOCK, &alrm, NULL);
	timer_t t4;
	if (timer_create(CLOCK_MONOTONIC, NULL, &t4))
		die("timer_create: %s", strerror(errno));
	arm(t4, 0, 1000000, 0, NULL);
	got = sigwaitinfo(&alrm, &si);
	printf("NULL sigevent: %s, si_value = the timer id: %s\n", got == SIGALRM ? "SIGALRM" : "?",
	       si.si_value.sival_int == (int)(intptr_t)t4 ? "yes" : "no");

	/* bad input */
	timer_delete(t4);
	printf("deleted timer: settime %s, ", err_str(arm(t4, 0, 1000000, 0, NULL)));
	printf("getoverrun %s, ", err_str(timer_getoverrun(t4)));
	printf("delete %s\n", err_str(timer_delete(t4)));
	struct itimerspec bad = {{0, 0}, {0, 1000000000}};
	printf("tv_nsec of 1e9: %s\n", err_str(timer_settime(t1, 0, &bad, NULL)));
	timer_t t5;
	struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = 65};
	printf("signal 65: %s\n", err_str(timer_create(CLOCK_MONOTONIC, &ev, &t5)));
	ev.sigev_signo = SIGUSR1;
	ev.sigev_notify = 99;
	printf("sigev_notify 99: %s\n", err_str(timer_create(CLOCK_MONOTONIC, &ev, &t5)));

	/* fork: the child has no timers; its own works */
	arm(t1, 0, 3600000000000L, 0, NULL);
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		int rc = timer_gettime(t1, &cur);
		int e = errno;
		timer_t c = new_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR2, 99);
		arm(c, 0, 5000000, 0, NULL);
		got = sigwaitinfo(&usr2, &si);
		errno = e;
		printf("child: the parent's timer %s; its own sends value %d\n",
		       rc ? (e == EINVAL ? "is EINVAL" : "?") : "exists", got == SIGUSR2 ? si.si_value.sival_int : -1);
		_exit(0);
	}
	int st;
	waitpid(pid, &st, 0);
	timer_gettime(t1, &cur);
	printf("parent's timer still armed after the fork: %s\n", cur.it_value.tv_sec > 3000 ? "yes" : "no");
	timer_delete(t1);
	return 0;
}

/* -- sigqueuefork ------------------------------------------------------------------ */
static int case_sigqueuefork(void)
{
	sigset_t rt;
	sigemptyset(&rt);
	sigaddset(&rt, SIGRTMIN);
	sigaddset(&rt, SIGUSR1);
	sigprocmask(SIG_BLOCK, &rt, NULL);
	pid_t parent = getpid();
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		for (int i = 0; i < 5; i++)
			sigqueue(parent, SIGRTMIN, (union sigval){.sival_int = 200 + i});
		kill(parent, SIGUSR1);
		siginfo_t si;
		int got = sigwaitinfo(&rt, &si);
		printf("child: %s from the parent, code=%s value=%d si_pid=%s\n", got == SIGRTMIN ? "SIGRTMIN" : "?",
		       si.si_code == SI_QUEUE ? "SI_QUEUE" : "?", si.si_value.sival_int,
		       si.si_pid == parent ? "parent" : "?");
		_exit(0);
	}
	siginfo_t si;
	sigset_t only_rt, only_usr1;
	sigemptyset(&only_rt);
	sigaddset(&only_rt, SIGRTMIN);
	sigemptyset(&only_usr1);
	sigaddset(&only_usr1, SIGUSR1);
	printf("parent: values from the child:");
	for (int i = 0; i < 5; i++) {
		if (sigwaitinfo(&only_rt, &si) != SIGRTMIN)
			die("sigwaitinfo: got %d", si.si_signo);
		printf(" %d%s", si.si_value.sival_int,
		       si.si_code == SI_QUEUE && si.si_pid == pid ? "" : "(bad code or pid)");
	}
	printf("\n");
	int got = sigwaitinfo(&only_usr1, &si);
	printf("parent: then %s code=%s si_pid=%s\n", got == SIGUSR1 ? "SIGUSR1" : "?",
	       si.si_code == SI_USER ? "SI_USER" : "?", si.si_pid == pid ? "child" : "?");
	sigqueue(pid, SIGRTMIN, (union sigval){.sival_int = 4242});
	int st;
	waitpid(pid, &st, 0);
	printf("child %s\n", status_str(st));
	return 0;
}

/* -- jobctl ----------------------------------------------------------------------- */
static volatile sig_atomic_t ttou_runs;

static void h_ttou(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	ttou_runs++;
}

/* A child in a group of its own (a background job) does `what`; the parent reports
 * how it ended (WUNTRACED: a stop is seen, then the child is killed). */
static void background(const char *title, void (*what)(void))
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		setpgid(0, 0);
		what();
		_exit(0);
	}
	setpgid(pid, pid);
	int st;
	if (waitpid(pid, &st, WUNTRACED) != pid)
		die("waitpid: %s", strerror(errno));
	printf("%s: %s\n", title, status_str(st));
	if (WIFSTOPPED(st)) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
	}
}

static void bg_tcsetpgrp(void)
{
	tcsetpgrp(0, getpgrp());
}

static void bg_read(void)
{
	char c;
	(void)read(0, &c, 1);
}

static void bg_read_ttin_ignored(void)
{
	char c;
	signal(SIGTTIN, SIG_IGN);
	int r = (int)read(0, &c, 1);
	printf("  read with SIGTTIN ignored: %d %s\n", r, errname(r < 0 ? errno : 0));
}

static void bg_tcsetpgrp_handler(void)
{
	on(SIGTTOU, h_ttou, 0, NULL);
	int r = tcsetpgrp(0, getpgrp());
	printf("  tcsetpgrp with a SIGTTOU handler: %d %s, handler ran %d time(s)\n", r, errname(r ? errno : 0),
	       (int)ttou_runs);
}

static void bg_take_terminal(void)
{
	signal(SIGTTOU, SIG_IGN);
	int r = tcsetpgrp(0, getpgrp());
	printf("  tcsetpgrp with SIGTTOU ignored: %s, the terminal's group is ours: %s\n", errname(r ? errno : 0),
	       tcgetpgrp(0) == getpgrp() ? "yes" : "no");
}

static void bg_orphan(void)
{
	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	pid_t me = getpid();
	pid_t pid = fork();
	if (pid == 0) { /* its group is orphaned once its parent is gone */
		close(p[0]);
		while (getppid() == me)
			usleep(1000);
		char c, out[160];
		int r = tcsetpgrp(0, getpgrp());
		int e1 = r ? errno : 0;
		int n = (int)read(0, &c, 1);
		int e2 = n < 0 ? errno : 0;
		snprintf(out, sizeof out, "  orphaned group: tcsetpgrp %s, read %s\n", errname(e1), errname(e2));
		(void)write(p[1], out, strlen(out));
		_exit(0);
	}
	close(p[1]);
	char buf[160];
	fflush(stdout);
	/* the parent leaves; whoever reads the pipe prints what the grandchild saw */
	if (fork() == 0) {
		int n = (int)read(p[0], buf, sizeof buf - 1);
		buf[n > 0 ? n : 0] = 0;
		printf("%s", buf);
		_exit(0);
	}
	_exit(0);
}

static int case_jobctl(void)
{
	pid_t fg = tcgetpgrp(0);
	if (fg < 0) {
		printf("tcgetpgrp(0): %s\n", errname(errno));
		return 0;
	}
	printf("tcgetpgrp(0) is our group: %s\n", fg == getpgrp() ? "yes" : "no");
	printf("TIOCSCTTY, not a session leader: %s\n", errname(ioctl(0, TIOCSCTTY, 0) ? errno : 0));
	background("background tcsetpgrp", bg_tcsetpgrp);
	background("background read", bg_read);
	background("background read, SIGTTIN ignored", bg_read_ttin_ignored);
	background("background tcsetpgrp, SIGTTOU handler", bg_tcsetpgrp_handler);
	background("background job takes the terminal", bg_take_terminal);
	pid_t now = tcgetpgrp(0);
	printf("now in the background: %s\n", now != getpgrp() ? "yes" : "no");
	int r = tcsetpgrp(0, now);
	printf("from the background, SIGTTOU default, an orphaned group: %s\n", errname(r ? errno : 0));
	sigset_t ttou, old;
	sigemptyset(&ttou);
	sigaddset(&ttou, SIGTTOU);
	sigprocmask(SIG_BLOCK, &ttou, &old);
	r = tcsetpgrp(0, now);
	printf("the same with SIGTTOU blocked: %s\n", errname(r ? errno : 0));
	r = tcsetpgrp(0, getpgrp());
	sigprocmask(SIG_SETMASK, &old, NULL);
	printf("taking the terminal back with SIGTTOU blocked: %s, ours again: %s\n", errname(r ? errno : 0),
	       tcgetpgrp(0) == getpgrp() ? "yes" : "no");
	int pl[2];
	if (pipe(pl))
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		close(pl[0]);
		setpgid(0, 0);
		bg_orphan();
	}
	close(pl[1]);
	int st;
	waitpid(pid, &st, 0);
	char c;
	while (read(pl[0], &c, 1) > 0) /* EOF: the orphan's reporter is done */
		;
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		setsid();
		int e = tcgetpgrp(0) < 0 ? errno : 0;
		printf("after setsid: tcgetpgrp %s, TIOCSCTTY %s\n", errname(e),
		       errname(ioctl(0, TIOCSCTTY, 0) ? errno : 0));
		_exit(0);
	}
	waitpid(pid, &st, 0);
	return 0;
}

/* -- spinhandler --------------------------------------------------------------- */
static volatile sig_atomic_t spin_flag;

static void h_flag(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	spin_flag = 1;
}

static int case_spinhandler(void)
{
	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	on(SIGUSR1, h_flag, 0, NULL);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		(void)write(p[1], "s", 1);
		while (!spin_flag)
			; /* no syscall: only an interrupted instruction stream runs the handler */
		_exit(9);
	}
	char c;
	if (read(p[0], &c, 1) != 1)
		die("read: %s", strerror(errno));
	kill(pid, SIGUSR1);
	int st;
	waitpid(pid, &st, 0);
	printf("spinning child with a handler: %s\n", status_str(st));
	return 0;
}

/* -- piperestart ---------------------------------------------------------------- */
static int case_piperestart(void)
{
	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	alarms = 0;
	on(SIGUSR1, h_alarm, SA_RESTART, NULL);
	pid_t parent = getpid();
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		struct timespec ts = {0, 200 * 1000 * 1000};
		close(p[0]);
		nanosleep(&ts, NULL);
		kill(parent, SIGUSR1);
		nanosleep(&ts, NULL);
		(void)write(p[1], "y", 1);
		_exit(0);
	}
	close(p[1]);
	char c = 0;
	ssize_t n = read(p[0], &c, 1);
	int st;
	waitpid(pid, &st, 0);
	printf("read across a fork, SA_RESTART: returned %zd '%c', handler ran %d time(s), child %s\n", n,
	       n == 1 ? c : '?', (int)alarms, status_str(st));
	return 0;
}

/* -- bad input ----------------------------------------------------------------- */
static int child_status(void (*fn)(void))
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		fn();
		_exit(0);
	}
	int st;
	waitpid(pid, &st, 0);
	return st;
}

static void unmapped_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = (void (*)(int))(uintptr_t)16;
	sigaction(SIGUSR1, &sa, NULL);
	raise(SIGUSR1);
}

static int case_badhandler(void)
{
	printf("handler at an unmapped address: %s\n", status_str(child_status(unmapped_handler)));
	return 0;
}

static void sigreturn_unmapped(void)
{
	__asm__ volatile("mov $16, %%rsp\n\tmov %0, %%eax\n\tsyscall" : : "i"(SYS_rt_sigreturn) : "memory");
}

static unsigned char junk[4096] __attribute__((aligned(16)));

static void sigreturn_garbage(void)
{
	memset(junk, 0xff, sizeof junk);
	__asm__ volatile("mov %0, %%rsp\n\tmov %1, %%eax\n\tsyscall"
			 :
			 : "r"(junk + 1024), "i"(SYS_rt_sigreturn)
			 : "memory");
}

static int case_badframe(void)
{
	printf("rt_sigreturn, frame unmapped: %s\n", status_str(child_status(sigreturn_unmapped)));
	printf("rt_sigreturn, frame of 0xff bytes: %s\n", status_str(child_status(sigreturn_garbage)));
	return 0;
}

/* -- storm --------------------------------------------------------------------- */
static volatile sig_atomic_t storm_hits, storm_done;

static void h_storm(int sig, siginfo_t *si, void *uc)
{
	(void)si, (void)uc;
	if (sig == SIGUSR2)
		storm_done = 1;
	else
		storm_hits++;
}

static int case_storm(int n)
{
	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		/* SIGUSR2 (the end) is blocked but in sigsuspend: one that came between
		 * the test of storm_done and a pause() would be lost, and the child
		 * would wait for ever (it did natively, once, under load). */
		sigset_t end, others;
		sigemptyset(&end);
		sigaddset(&end, SIGUSR2);
		sigprocmask(SIG_BLOCK, &end, &others);
		on(SIGUSR1, h_storm, SA_RESTART, NULL);
		on(SIGUSR2, h_storm, SA_RESTART, NULL);
		(void)write(p[1], "r", 1);
		while (!storm_done)
			sigsuspend(&others);
		_exit(storm_hits >= 1 ? 0 : 1);
	}
	char c;
	if (read(p[0], &c, 1) != 1)
		die("read: %s", strerror(errno));
	int sent = 0;
	for (int i = 0; i < n; i++)
		sent += kill(pid, SIGUSR1) == 0;
	kill(pid, SIGUSR2);
	int st;
	waitpid(pid, &st, 0);
	printf("storm: %d of %d kills accepted, child %s\n", sent, n, status_str(st));
	return 0;
}

/* -- flood --------------------------------------------------------------------- */
static volatile sig_atomic_t flood_hits;

static void h_flood(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	flood_hits++;
}

static int case_flood(void)
{
	int p[2];
	if (pipe(p))
		die("pipe: %s", strerror(errno));
	on(SIGUSR1, h_flood, SA_RESTART, NULL);
	pid_t parent = getpid();
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		(void)write(p[1], "f", 1);
		for (;;)
			kill(parent, SIGUSR1); /* until the parent kills us */
	}
	char c;
	if (read(p[0], &c, 1) != 1)
		die("read: %s", strerror(errno));
	/* work without syscalls under the flood: each handler's return must give the CPU
	 * back to the work, not to the flooding child */
	while (!flood_hits)
		;
	volatile unsigned long sum = 0;
	for (unsigned long i = 0; i < 2000000; i++)
		sum += i;
	kill(pid, SIGKILL);
	int st;
	waitpid(pid, &st, 0);
	printf("flood: work done under a flood of kills, sum %lu, child %s\n", sum, status_str(st));
	return 0;
}

/* -- stopread ------------------------------------------------------------------ */
static volatile sig_atomic_t cont_runs;

static void h_cont(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	cont_runs++;
}

static int case_stopread(void)
{
	int p[2], ready[2];
	if (pipe(p) || pipe(ready))
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		on(SIGCONT, h_cont, 0, NULL);
		close(p[1]);
		(void)write(ready[1], "r", 1);
		char c = 0;
		ssize_t n = read(p[0], &c, 1);
		int e = errno;
		printf("child: read stopped and continued: %zd %s, SIGCONT handler ran %d time(s)\n", n,
		       n < 0 ? errname(e) : n ? "(data)" : "(EOF)", (int)cont_runs);
		n = read(p[0], &c, 1);
		printf("child: read again: %zd %s\n", n, n < 0 ? errname(errno) : n ? "(data)" : "(EOF)");
		_exit(0);
	}
	close(p[0]);
	char c;
	if (read(ready[0], &c, 1) != 1)
		die("read: %s", strerror(errno));
	struct timespec ts = {0, 200 * 1000 * 1000};
	nanosleep(&ts, NULL); /* the child is in its read by now */
	kill(pid, SIGSTOP);
	int st;
	waitpid(pid, &st, WUNTRACED);
	printf("parent: child %s, writing while it is stopped\n", status_str(st));
	(void)write(p[1], "z", 1);
	close(p[1]);
	kill(pid, SIGCONT);
	waitpid(pid, &st, 0);
	printf("parent: child %s\n", status_str(st));
	return 0;
}

/* -- roundtrip ----------------------------------------------------------------- */
static void h_nothing(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)si, (void)uc;
	runs++;
}

static int case_roundtrip(int n, int timed)
{
	struct timespec t0, t1;
	on(SIGUSR1, h_nothing, 0, NULL);
	pid_t me = getpid();
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++)
		kill(me, SIGUSR1);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("roundtrips=%d\n", (int)runs);
	if (timed)
		printf("signal_roundtrip_us=%.3f\n",
		       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / (n ? n : 1));
	return 0;
}

/* -- pingpong ------------------------------------------------------------------------ */
static int case_pingpong(int n, int timed)
{
	sigset_t usr1, unblocked;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, &unblocked);
	sigdelset(&unblocked, SIGUSR1);
	on(SIGUSR1, h_nothing, 0, NULL);
	pid_t parent = getpid();
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		for (int i = 0; i < n; i++) {
			sigsuspend(&unblocked); /* ping: the handler ran */
			kill(parent, SIGUSR1);
		}
		_exit(0); /* (no count of handler runs: thread fork shares the globals) */
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++) {
		kill(pid, SIGUSR1);
		sigsuspend(&unblocked); /* pong */
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	int st;
	waitpid(pid, &st, 0);
	printf("pingpong: %d round trips, child %s\n", n, status_str(st));
	if (timed)
		printf("kill_latency_us=%.1f\n",
		       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / 2 / (n ? n : 1));
	return 0;
}

int main(int argc, char **argv)
{
	top_pid = getpid();
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *c = argc > 1 ? argv[1] : "";
	int n = argc > 2 ? atoi(argv[2]) : 0;
	if (!strcmp(c, "handler"))
		return case_handler();
	if (!strcmp(c, "restart"))
		return case_restart();
	if (!strcmp(c, "sigsuspend"))
		return case_sigsuspend();
	if (!strcmp(c, "sigchld"))
		return case_sigchld();
	if (!strcmp(c, "nodefer"))
		return case_nodefer();
	if (!strcmp(c, "altstack"))
		return case_altstack();
	if (!strcmp(c, "ucontext"))
		return case_ucontext();
	if (!strcmp(c, "rtqueue"))
		return case_rtqueue();
	if (!strcmp(c, "stopcont"))
		return case_stopcont();
	if (!strcmp(c, "killspin"))
		return case_killspin();
	if (!strcmp(c, "jobctl"))
		return case_jobctl();
	if (!strcmp(c, "sigqueuefork"))
		return case_sigqueuefork();
	if (!strcmp(c, "timers"))
		return case_timers();
	if (!strcmp(c, "core"))
		return core_run(0);
	if (!strcmp(c, "coredump"))
		return core_run(1);
	if (!strcmp(c, "spinhandler"))
		return case_spinhandler();
	if (!strcmp(c, "piperestart"))
		return case_piperestart();
	if (!strcmp(c, "badhandler"))
		return case_badhandler();
	if (!strcmp(c, "badframe"))
		return case_badframe();
	if (!strcmp(c, "storm"))
		return case_storm(n ? n : 100000);
	if (!strcmp(c, "flood"))
		return case_flood();
	if (!strcmp(c, "stopread"))
		return case_stopread();
	if (!strcmp(c, "pingpong"))
		return case_pingpong(n ? n : 100, argc > 3 && !strcmp(argv[3], "-t"));
	if (!strcmp(c, "roundtrip"))
		return case_roundtrip(n ? n : 1000, argc > 3 && !strcmp(argv[3], "-t"));
	fprintf(stderr, "usage: signals handler|restart|sigsuspend|sigchld|nodefer|altstack|ucontext|rtqueue|"
			"stopcont|killspin|jobctl|sigqueuefork|timers|core|coredump|spinhandler|piperestart|badhandler|badframe|storm [N]|flood|stopread|pingpong [N] [-t]|roundtrip [N] [-t]\n");
	return 2;
}
