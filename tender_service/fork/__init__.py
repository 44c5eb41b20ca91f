"""How a process forks, one module per strategy (the rest of each mode is above).

* thread fork: ``thread.py`` (the rest: ``vm.py``, ``instance/vmserver.py``,
  ``instance/threadvm.py``, ``instance/backends/thread.py``);
* VM-clone fork: ``vmclone.py`` and ``snapshot.py`` (the rest: ``transports/``,
  ``instance/pool.py``, ``instance/worker.py``, ``instance/supervisor.py``,
  ``instance/backends/vmclone.py``).

docs/architecture.md ("Fork modes") lists each mode's modules.
"""
