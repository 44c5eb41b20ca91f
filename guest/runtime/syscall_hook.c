/*
 * syscall_hook.c — the guest's syscall entry into the kernel: built for the HOST
 * (not the guest) by the toolchain and loaded into every process that runs VMs.
 *
 * Unicorn calls unifork_syscall_hook on every guest `syscall` (a UC_HOOK_INSN
 * hook).  It reads rax and the six argument registers into the kernel's
 * register buffer, calls the kernel's dispatcher (a Python callable taking no
 * arguments) and, if the dispatcher returns an int, writes it to rax: the
 * syscall's return value, wrapped to 64 bits as the ABI wants (-errno too).
 * A dispatcher that returns None has left rax as it must be (a blocked or
 * restarted syscall, a context switch).
 *
 * Before this the hook was a ctypes callback, and reading the registers and
 * writing rax were two more ctypes calls from Python: about half of a cheap
 * syscall's round trip (issue 17).
 *
 * Signals: the running thread's mask and its process's pending set live in
 * two 64-bit cells the kernel points this entry at (Lwp.sigmask and
 * Process.pending are views of them).  After a syscall the kernel answered,
 * a pending signal the mask lets through stops the CPU, so that the kernel's
 * loop delivers it on the way back to user mode.  rt_sigprocmask itself is
 * answered here, without the kernel (musl's fork makes four; each cost 4-6 us
 * through Python): the same checks in the same order as the kernel's
 * sys_rt_sigprocmask, and anything it does not handle the same way (an
 * unusual size or `how`, a pointer it cannot read or write) goes to the kernel,
 * which then does it all again from the start: nothing has changed by then.
 *
 * No Python.h: a machine with only a Python interpreter has no headers.  The
 * few functions used are CPython's stable ABI, exported by the interpreter
 * that loads this library (ctypes resolves them when it loads it), so they
 * are declared here by hand.  uc_emu_start runs with the GIL released (the
 * tender's other threads stop the guest while it runs), so the hook takes it.
 */
#include <stddef.h>
#include <stdint.h>

typedef struct _object PyObject;
typedef int PyGILState_STATE;

extern PyGILState_STATE PyGILState_Ensure(void);
extern void PyGILState_Release(PyGILState_STATE);
extern PyObject *PyObject_CallNoArgs(PyObject *);
extern unsigned long long PyLong_AsUnsignedLongLongMask(PyObject *);
extern PyObject *PyErr_Occurred(void);
extern void PyErr_WriteUnraisable(PyObject *);
extern void Py_DecRef(PyObject *);
extern PyObject _Py_NoneStruct;

#define NREGS 7
#define NR_RT_SIGPROCMASK 14
#define SIG_BLOCK 0
#define SIG_UNBLOCK 1
#define SIG_SETMASK 2
/* SIGKILL and SIGSTOP: no mask holds them (bit n-1 is signal n) */
#define UNBLOCKABLE ((1ULL << 8) | (1ULL << 18))

/* the layout of tender_service/machine/cpu.py:_SyscallEntry */
struct unifork_syscall_entry {
	PyObject *dispatch;                                     /* () -> int | None */
	int (*read_batch)(void *uc, const int *ids, void **vals, int count); /* uc_reg_read_batch */
	int (*write)(void *uc, int id, const void *value);      /* uc_reg_write */
	int ids[NREGS];                                         /* rax, rdi, rsi, rdx, r10, r8, r9 */
	void *vals[NREGS];                                      /* where each one goes */
	int (*mem_read)(void *uc, uint64_t addr, void *bytes, uint64_t size);        /* uc_mem_read */
	int (*mem_write)(void *uc, uint64_t addr, const void *bytes, uint64_t size); /* uc_mem_write */
	int (*emu_stop)(void *uc);                              /* uc_emu_stop */
	uint64_t *sigmask;   /* the running thread's signal mask */
	uint64_t *pending;   /* its process's pending signals */
	int32_t fast;        /* answer rt_sigprocmask here (not while syscalls are traced) */
	int32_t events;      /* the kernel has work from other threads: every syscall goes to it */
	int32_t stopped;     /* this entry stopped the CPU (Cpu.run reads and clears it) */
	int32_t unused;
	uint64_t answered;   /* syscalls answered here (the kernel's count adds them) */
};

/* rt_sigprocmask(how, set, oset, sigsetsize) as the kernel's, or 0: the kernel's to do */
static int sigprocmask_here(void *uc, struct unifork_syscall_entry *e)
{
	uint64_t how = *(uint64_t *)e->vals[1], set = *(uint64_t *)e->vals[2];
	uint64_t oset = *(uint64_t *)e->vals[3], size = *(uint64_t *)e->vals[4];
	uint64_t old = *e->sigmask, mask = old, new_set, zero = 0;

	if (size != 8)
		return 0;
	if (set) {
		if (e->mem_read(uc, set, &new_set, 8))
			return 0;
		switch ((uint32_t)how) { /* an int argument */
		case SIG_BLOCK:
			mask = old | new_set;
			break;
		case SIG_UNBLOCK:
			mask = old & ~new_set;
			break;
		case SIG_SETMASK:
			mask = new_set;
			break;
		default:
			return 0;
		}
	}
	if (oset && e->mem_write(uc, oset, &old, 8))
		return 0;
	if (set)
		*e->sigmask = mask & ~UNBLOCKABLE;
	e->write(uc, e->ids[0], &zero);
	e->answered++;
	return 1;
}

/* a signal is pending that the running thread does not block: stop the CPU */
static void stop_for_signal(void *uc, struct unifork_syscall_entry *e)
{
	if (e->sigmask && (*e->pending & ~*e->sigmask)) {
		e->stopped = 1;
		e->emu_stop(uc);
	}
}

void unifork_syscall_hook(void *uc, void *data)
{
	struct unifork_syscall_entry *e = data;
	PyGILState_STATE gil;
	PyObject *ret;
	uint64_t rax;

	e->read_batch(uc, e->ids, e->vals, NREGS);
	if (e->fast && !e->events && e->sigmask && *(uint64_t *)e->vals[0] == NR_RT_SIGPROCMASK &&
	    sigprocmask_here(uc, e)) {
		stop_for_signal(uc, e);
		return;
	}
	gil = PyGILState_Ensure();
	ret = PyObject_CallNoArgs(e->dispatch);
	if (ret == 0) {
		/* the dispatcher catches the kernel's errors itself; what escapes it
		 * (an interrupt) is reported as ctypes reported it, and the guest goes on */
		PyErr_WriteUnraisable(e->dispatch);
	} else {
		if (ret != &_Py_NoneStruct) {
			rax = PyLong_AsUnsignedLongLongMask(ret);
			if (rax == (uint64_t)-1 && PyErr_Occurred())
				PyErr_WriteUnraisable(e->dispatch);
			else
				e->write(uc, e->ids[0], &rax);
			stop_for_signal(uc, e);
		}
		Py_DecRef(ret);
	}
	PyGILState_Release(gil);
}
