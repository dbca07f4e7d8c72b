"""Running a generated program and its tests: in a child process, with a timeout and no network.

This keeps an evaluation from hanging, reaching the network or filling memory by accident; it is not
a security boundary against hostile code (run untrusted models' code in a container). Code runs only
when the user opted in (``edgerazor eval --allow-code-execution``, lm-eval's ``confirm_run_unsafe_code``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from math import comb

#: seconds one program (solution + its tests) may run
DEFAULT_TIMEOUT = 10.0
#: address space a program may take
MEMORY_LIMIT = 2 * 2**30

#: run first in the child: refuse sockets and starting other programs (an audit hook cannot be removed), cap
#: memory and CPU time, then execute the program from stdin.
_PRELUDE = r"""
import resource, sys
_BLOCKED = ("socket.", "urllib.Request", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
            "os.spawn", "os.fork", "os.forkpty", "pty.spawn")
def _no_network(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"{{event}} is disabled while evaluating generated code (no network, no programs)")
sys.addaudithook(_no_network)
for limit, value in ((resource.RLIMIT_AS, {memory}), (resource.RLIMIT_CPU, {cpu})):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
_program = sys.stdin.read()
exec(compile(_program, "<generated>", "exec"), {{"__name__": "__main__"}})
"""


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "failed: <last line of stderr>", "timed out"


def run_program(program: str, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run ``program`` in a fresh interpreter (isolated mode, empty working folder, no proxies); it passes
    when it exits with status 0 within ``timeout`` seconds. The whole process group dies on a timeout."""
    prelude = _PRELUDE.format(memory=MEMORY_LIMIT, cpu=int(timeout) + 1)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="edgerazor-code-") as work:
        child = subprocess.Popen([sys.executable, "-I", "-c", prelude], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work, env=env,
                                 start_new_session=True, text=True)
        try:
            _, err = child.communicate(program, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Outcome(False, "timed out")
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    if child.returncode == 0:
        return Outcome(True, "passed")
    last = (err or "").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
    return Outcome(False, f"failed: {last[0]}")


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``correct`` pass (Chen et al. 2021)."""
    if n - correct < k:
        return 1.0
    return 1.0 - comb(n - correct, k) / comb(n, k)
