"""`python -m tools.with_parent PID PROGRAM ARGS...`: run PROGRAM so that it gets SIGTERM
when its parent, process PID, dies (even by SIGKILL or a broken pipe).

For programs that cannot ask for it themselves, like the nats-server binary: the request
(Linux `prctl(PR_SET_PDEATHSIG)`) is made here and survives the `exec`. Elsewhere this only
execs PROGRAM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, program, *args = sys.argv[1:]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(parent):  # the parent died before the request took effect
            sys.exit(1)
    os.execv(program, [program, *args])


if __name__ == "__main__":
    main()
