"""Crash injection for the crash-safety test (on PYTHONPATH only there; never installed).

With SPINECOHORT_CRASH="<subcommand>:<n>", a `spinecohort <subcommand>` process kills its
whole process group (the job and the Snakemake that started it, as a node failure would)
with SIGKILL at its n-th file rename, i.e. with a finished temporary file not yet renamed.
"""

import os
import signal
import sys

_target = os.environ.get("SPINECOHORT_CRASH")
if _target:
    _stage, _at = _target.rsplit(":", 1)
    _replace = os.replace
    _count = 0

    def _replace_or_die(src, dst, *args, **kwargs):
        global _count
        if os.path.basename(sys.argv[0]) == "spinecohort" and sys.argv[1:2] == [_stage]:
            _count += 1
            if _count == int(_at):
                os.killpg(os.getpgrp(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
