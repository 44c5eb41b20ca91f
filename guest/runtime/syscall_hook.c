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
 * No Python.h: a machine with only a Python interpreter has no headers.  The
 * few functions used are CPython's stable ABI, exported by the interpreter
 * that loads this library (ctypes resolves them when it loads it), so they
 * are declared here by hand.  uc_emu_start runs with the GIL released (the
 * tender's other threads stop the guest while it runs), so the hook takes it.
 */
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

/* the layout of tender_service/machine/cpu.py:_SyscallEntry */
struct unifork_syscall_entry {
	PyObject *dispatch;                                     /* () -> int | None */
	int (*read_batch)(void *uc, const int *ids, void **vals, int count); /* uc_reg_read_batch */
	int (*write)(void *uc, int id, const void *value);      /* uc_reg_write */
	int ids[NREGS];                                         /* rax, rdi, rsi, rdx, r10, r8, r9 */
	void *vals[NREGS];                                      /* where each one goes */
};

void unifork_syscall_hook(void *uc, void *data)
{
	struct unifork_syscall_entry *e = data;
	PyGILState_STATE gil;
	PyObject *ret;
	uint64_t rax;

	e->read_batch(uc, e->ids, e->vals, NREGS);
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
		}
		Py_DecRef(ret);
	}
	PyGILState_Release(gil);
}
