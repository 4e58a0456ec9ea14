"""Run untrusted generated Python (pass@1) so that nothing it does reaches the user's machine.

Each program runs in its own process, in its own session, inside a fresh temporary folder, with
layers that each contain a different escape:

- time: a wall-clock limit (the whole process group is killed) and RLIMIT_CPU;
- memory: RLIMIT_AS (a huge allocation raises MemoryError or the process dies);
- processes: RLIMIT_NPROC for the unprivileged user it runs as, and an audit hook that refuses
  fork/exec/spawn (a fork bomb gets nowhere);
- files: it runs as user `nobody` when afina runs as root (so the user's files are not writable),
  RLIMIT_FSIZE caps what it writes, and an audit hook refuses opening any path for writing
  outside its folder;
- network: `unshare --net` puts it in an empty network namespace where the kernel allows that;
  where it does not (no `unshare`, or no permission), the audit hook refuses creating sockets.
  That fallback is a Python-level guard: it stops ordinary code, not a determined attacker
  loading native code, which is why ctypes is refused too.

    result = run_program("assert 1 + 1 == 2", time_limit_s=5, memory_mb=256)
    result.passed  # True
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The harness the child runs: drop privileges, install the guard, then run the program.
# It reads the program from program.py in its working folder.
_HARNESS = r'''
import os, sys
folder = os.path.realpath(os.getcwd())
# Load the standard modules tasks use while still able to read them: an interpreter installed
# under a private home (pyenv in /root) is not readable once the program runs as nobody.
for name in ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "operator",
             "typing", "statistics", "fractions", "decimal", "random", "datetime", "copy", "json", "array",
             "cmath", "textwrap", "unicodedata", "socket", "subprocess", "struct", "hashlib", "time"):
    try:
        __import__(name)
    except ImportError:
        pass
if os.getuid() == 0:
    try:
        import pwd
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    except (KeyError, OSError, PermissionError):
        pass
source = open("program.py", encoding="utf-8").read()
BLOCKED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "socket.__new__", "socket.connect", "socket.bind", "ctypes.dlopen", "ctypes.dlsym", "os.kill", "os.killpg",
           "pty.spawn", "os.chdir", "os.chroot", "os.setuid", "os.putenv"}
WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod", "os.chown",
                "os.symlink", "os.link", "os.truncate", "os.utime"}
def inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else folder)
    except Exception:
        return False
    return real == folder or real.startswith(folder + os.sep)
def guard(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
        if writing and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]} outside the sandbox folder is not allowed")
    elif event in WRITE_EVENTS and args and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the sandbox folder is not allowed")
sys.addaudithook(guard)
del guard
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed", "timeout", "memory", "error"
    returncode: int | None
    stderr_tail: str
    wall_s: float


@functools.lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """The command prefix that gives a child an empty network namespace, or [] where none works."""
    unshare = shutil.which("unshare")
    if not unshare:
        return []
    for prefix in ([unshare, "--net"], [unshare, "--user", "--map-root-user", "--net"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def _limit_child(time_limit_s: float, memory_mb: int) -> None:  # runs in the child, before exec
    import resource

    cpu = max(1, int(time_limit_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Counted per user: root is exempt, so the harness drops to `nobody` when started as root.
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))


def run_program(source: str, time_limit_s: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    """Run Python source in the sandbox; it passes when it exits with status 0 in time."""
    folder = Path(tempfile.mkdtemp(prefix="afina-sandbox-"))
    try:
        (folder / "program.py").write_text(source, encoding="utf-8")
        (folder / "harness.py").write_text(_HARNESS, encoding="utf-8")
        if os.getuid() == 0:  # the harness runs as nobody from here on: it must own its folder
            import pwd

            try:
                nobody = pwd.getpwnam("nobody")
                for path in (folder, folder / "program.py", folder / "harness.py"):
                    os.chown(path, nobody.pw_uid, nobody.pw_gid)
            except KeyError:
                pass
        env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "TMPDIR": str(folder), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        command = [*network_isolation(), sys.executable, "-I", "-S", "harness.py"]
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills every descendant
            preexec_fn=functools.partial(_limit_child, time_limit_s, memory_mb),
        )
        try:
            _, stderr = proc.communicate(timeout=time_limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            _, stderr = proc.communicate()
        wall = time.perf_counter() - start
        _kill_group(proc.pid)  # anything it left behind
        tail = stderr.decode("utf-8", "replace")[-2000:]
        if timed_out or proc.returncode in (-9, -24):  # SIGKILL from us, SIGXCPU from RLIMIT_CPU
            status = "timeout"
        elif proc.returncode == 0:
            status = "passed"
        elif "MemoryError" in tail:
            status = "memory"
        elif proc.returncode and proc.returncode < 0:
            status = "error"
        else:
            status = "failed"
        return SandboxResult(status == "passed", status, proc.returncode, tail, round(wall, 3))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def program_for_task(code: str, tests: list[str], setup: str = "") -> str:
    """The program pass@1 runs: the task's setup, the generated code, then the task's asserts."""
    return "\n".join([setup, code, "", *tests, ""])


def extract_code(answer: str) -> str:
    """The code in a model's answer: the first fenced block if there is one, else the whole answer."""
    import re

    fenced = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", answer, flags=re.DOTALL)
    return fenced[0] if fenced else answer
