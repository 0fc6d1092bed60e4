"""The command line (both sides): click commands that parse options, call the package and render.

Runs on the build machine and on the device; a command imports its build-side modules only
inside its own body, so ``edgepack serve`` or ``edgepack agent`` on a Pi never loads torch.
``main`` is the root group; one module per command family (``build``, ``plan``, ``profiles``,
``serve``, ``ota``) and ``render`` for the plan's human output.
"""
