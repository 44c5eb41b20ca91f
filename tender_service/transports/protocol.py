"""Messages between a VM (in its tender process) and its instance supervisor.

They travel as ``frames.Frame`` over the instance's channel (tcp or shm).
Field use per type (``req`` matches a reply to its request; ``pipe`` is a
broker pipe id; ``arg`` is a signed 64-bit value)::

    VM -> supervisor
      CONSOLE     pipe=fd (1/2)  arg=pid             payload=bytes
      EXITED      arg=wait status                    (the VM's process ended)
                  payload=JSON {"peak_memory", "report", "hosting": true if
                  clone(CLONE_VM) children of it still run in the VM (it goes on)}
      REAPED      arg=pid of the reaped child
      CALL        req  payload=JSON {"op": str, "args": [int...]}  -> RESULT
      PIPE_READ   req pipe  arg=max bytes  flags=NONBLOCK          -> PIPE_DATA
                  payload=optional u64: the bytes the reader's buffer can take;
                  more to give than that is EFAULT with nothing taken (as Linux)
      PIPE_WRITE  req pipe  flags=NONBLOCK  payload=bytes          -> PIPE_WROTE
      PIPE_CLOSE  pipe  arg=END_READ|END_WRITE
      IDLE        arg=events processed so far (every thread blocked)
      STDIN_READ  req  arg=max bytes  flags=NONBLOCK               -> PIPE_DATA
                  (the console's fd 0: the instance's stdin)
      ACCEPT      req  pipe=listener id  flags=NONBLOCK            -> PIPE_DATA
                  (a shared listener's next connection: payload JSON {"rx", "tx":
                  its two broker pipes, "peer": [ip, port]})
      CONNECT     req  payload=JSON {"ip", "port"}                 -> PIPE_DATA
                  (a TCP connect out of the instance, if its allow-list has it:
                  arg=-errno, or payload JSON {"rx", "tx"}: the connection's pipes)
    supervisor -> VM
      RESULT      req  arg=value or -errno  payload=optional JSON
      PIPE_DATA   req  arg=-errno or 0  payload=bytes (empty with arg 0: EOF)
      PIPE_WROTE  req  arg=bytes written or -errno  flags=SIGPIPE
      CHILD_EXIT  pipe=child pid  arg=wait status
      SIGNAL      arg=signal number  pipe=sender pid (0: the kernel)
                  req=0: the VM's process; else the pid of a clone(CLONE_VM) child
                  that runs in the VM until it execs (an unsolicited frame: no reply)
                  payload=empty (SI_USER) or SIGNAL_INFO: si_code, si_value (sigqueue)
      REPARENT    arg=new parent pid
      CHILD_STATE pipe=child pid  arg=wait status of a stop or continue (job control)
"""

from __future__ import annotations

import enum
import struct


class Msg(enum.IntEnum):
    CONSOLE = 1
    EXITED = 2
    REAPED = 3
    CALL = 4
    PIPE_READ = 5
    PIPE_WRITE = 6
    PIPE_CLOSE = 7
    IDLE = 8
    STDIN_READ = 9
    ACCEPT = 10
    CONNECT = 11
    RESULT = 64
    PIPE_DATA = 65
    PIPE_WROTE = 66
    CHILD_EXIT = 67
    SIGNAL = 68
    REPARENT = 69
    CHILD_STATE = 70


NONBLOCK = 1
#: a SIGNAL frame's payload when it is not a plain kill: si_code (int32), si_value (int64)
SIGNAL_INFO = struct.Struct("<iq")
SIGPIPE_FLAG = 1
END_READ, END_WRITE = 0, 1
#: how much of one write travels in one PIPE_WRITE (under frames.MAX_PAYLOAD)
MAX_PIPE_CHUNK = 512 << 10
