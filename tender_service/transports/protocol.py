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
      PIPE_WRITE  req pipe  flags=NONBLOCK|FILES  payload=bytes    -> PIPE_WROTE
                  FILES: the payload is ``pack_files``: the snapshot states
                  (fork/snapshot.py ``file_state``) of an SCM_RIGHTS message's
                  files, then the bytes; they ride on the write's first byte. The
                  supervisor takes the writer's refs of them for the pipe at once
                  (EBADF if it holds none) and gives them back if no byte goes in
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
                  flags=FILES: ``pack_files`` of the files the bytes carry; the
                  reader's VM holds their refs from then on
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
import json
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
    #: a brokered pipe or a shared listener this VM polled changed: its threads in
    #: poll look again
    POLL_WAKE = 71


NONBLOCK = 1
#: a SIGNAL frame's payload when it is not a plain kill: si_code (int32), si_value (int64)
SIGNAL_INFO = struct.Struct("<iq")
#: the data of a ``pipe_refs_many`` CALL, one per pipe end a new holder gets: the
#: pipe, the readers and the writers it adds (a fork registers its child's ends in
#: one round trip, however many pipes its fd table holds)
PIPE_REFS = struct.Struct("<iii")
SIGPIPE_FLAG = 1
#: a PIPE_WRITE's or PIPE_DATA's payload starts with file states (``pack_files``)
FILES = 2
_FILES_HEAD = struct.Struct("<I")
END_READ, END_WRITE = 0, 1
#: how much of one write travels in one PIPE_WRITE (under frames.MAX_PAYLOAD)
MAX_PIPE_CHUNK = 512 << 10


def pack_files(states: list[dict], data: bytes) -> bytes:
    """A FILES payload: the JSON list of file states (length-prefixed), then the data."""
    head = json.dumps(states).encode()
    return _FILES_HEAD.pack(len(head)) + head + data


def unpack_files(payload: bytes) -> tuple[list[dict], bytes]:
    """(file states, data) of a FILES payload; ValueError if it is not one."""
    if len(payload) < _FILES_HEAD.size:
        raise ValueError("short FILES payload")
    (n,) = _FILES_HEAD.unpack_from(payload)
    end = _FILES_HEAD.size + n
    if end > len(payload):
        raise ValueError("FILES header past the payload")
    states = json.loads(payload[_FILES_HEAD.size : end])
    if not isinstance(states, list) or not all(isinstance(x, dict) for x in states):
        raise ValueError("FILES header is not a list of objects")
    return states, payload[end:]
