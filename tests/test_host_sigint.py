"""^C to a process running a VM on its main thread, whichever thread takes it.

Linux delivers a process-directed SIGINT to any thread that does not block it.
CPython runs Python handlers on the main thread only, and a VM idle in poll
there (its processes wait for host input, no timer) has no reason to wake: ^C
taken by another thread (a published port's I/O thread, the watchdog) was lost
until something else woke the VM (`unifork run` of an idle server ignored ^C
once in a while).  The kernel makes the signal write to its wake-up pipe.

And ^C can come while the main thread is inside ``Cpu.stop`` (a blocking syscall
parks its thread and stops the CPU): the handler stops the CPU too, on the same
thread; with a plain lock there it deadlocked (`unifork run` of prefork_http
ignored ^C for good about once in 20 runs, CI's test_published failures).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from support import image_path, wait_until

from tender_service.rump.vminfo import VmConfig
from tender_service.vm import create_vm

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="the kernel takes ^C only on the main thread",
)


def test_sigint_taken_by_another_thread_ends_an_idle_vm() -> None:
    r, w = os.pipe()
    k = create_vm(image_path("stdin_sum"), [], config=VmConfig(), sink=lambda *a: None, stdin=r)
    ended = threading.Event()
    rescued: list[bool] = []

    def helper() -> None:
        # the VM sleeps in poll on the main thread: its one process reads the empty pipe
        wait_until(
            lambda: any("read" in line for line in k.blocked_report()),
            60,
            "the guest to block reading stdin",
        )
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread only
        if not ended.wait(30):  # not woken: end the guest's read so the test ends
            rescued.append(True)
            os.write(w, b"x")
        os.close(w)

    t = threading.Thread(target=helper, daemon=True)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                k.run()
            finally:
                ended.set()
    finally:
        t.join(60)
        k.close()
        os.close(r)
    assert rescued == [], "^C taken by another thread did not wake the idle VM"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    assert signal.set_wakeup_fd(-1) == -1  # and the wake-up fd too


#: the kernel's ^C handler (it stops the CPU) arriving while stop() holds its lock
_REENTER = """
import signal
from tender_service.machine.cpu import Cpu
from tender_service.machine.memory import GuestMemory
cpu = Cpu(GuestMemory(1 << 20))
signal.signal(signal.SIGINT, lambda signum, frame: cpu.stop())
with cpu._closing:  # where stop() is when a signal's handler runs inside it
    signal.raise_signal(signal.SIGINT)  # the handler runs here, on this thread
cpu.close()
print("stopped twice")
"""


def test_a_signal_handler_may_stop_the_cpu_inside_stop() -> None:
    r = subprocess.run([sys.executable, "-c", _REENTER], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "stopped twice\n"), r.stderr
