"""Processes that host VMs, by fork mode; ``backends/`` is how the layers above start them.

* both modes: ``backends/`` (the ``InstanceBackend`` interface, ``RunResult`` for
  every mode, the registry of modes), ``budget.py``, ``jail.py``, ``childproc.py``,
  ``hostmalloc.py``;
* thread fork: ``vmserver.py`` (the fork server and VM processes), ``threadvm.py``
  (the tender's side), ``backends/thread.py``;
* VM-clone fork: ``pool.py`` and ``worker.py`` (tender processes that host VMs),
  ``supervisor.py`` (an instance's init, process tree and pipes),
  ``backends/vmclone.py``.
"""
