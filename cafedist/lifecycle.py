"""How this process ends: decided by the command-line entry point, read by the runtime.

:func:`cafedist.cli.run` (the ``cafedist`` script and ``python -m cafedist``) ends the process
with ``os._exit`` after a distributed command, so the runtime need not (and should not) tear
the process group down; library callers (submitit jobs, tests) keep the default and get a
clean teardown. Kept free of imports so that setting it costs nothing.
"""

EXIT_WITHOUT_TEARDOWN = False
