"""Run a module under cProfile counting CPU time, not wall time (on a busy machine, wall time
mostly measures waiting for a core):

    python bench/cpu_profile.py OUT.prof -m agent.cli run ...

The profile is written when the module exits (SystemExit included); read it with pstats.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    # As `python -m` would: the tree's root first, not bench/ (whose common.py is not the package).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    profile = cProfile.Profile(time.process_time)
    try:
        profile.runcall(runpy.run_module, module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
