"""Run untrusted generated Python (pass@1) so that nothing it does reaches the user's machine.

Each program runs in its own process inside bubblewrap (`bwrap`, an OS-level sandbox; Debian
package `bubblewrap`):

- files: only /usr, the Python installation (read-only) and a fresh empty folder (its working
  folder and home) exist; a private empty /tmp; no /etc, no home, no /work: the host's files are
  not there to read or write, whatever the code does (native code, raw syscalls, file descriptors);
- processes: its own PID namespace (it sees and can signal only its own processes; when it ends,
  all of them end), no capabilities, no new privileges (setuid binaries give nothing); when afina
  runs as root, the program runs as user `nobody`;
- network: an empty network namespace (not even the host's loopback);
- resources: a wall-clock limit (the whole tree is killed), RLIMIT_CPU, RLIMIT_AS (a huge
  allocation raises MemoryError), RLIMIT_FSIZE, RLIMIT_NOFILE, and RLIMIT_NPROC (a fork bomb
  gets nowhere).

Without bubblewrap, pass@1 refuses to run (SandboxUnavailable, saying how to install it) unless
the recipe says `eval.sandbox.allow_weak: true`. The weak sandbox (the same limits, a switch to
`nobody` when run as root, `unshare --net` where allowed, and a Python audit hook refusing
fork/exec/sockets/writes outside its folder) stops ordinary code, not a determined attacker:
`_posixsubprocess.fork_exec` or `os.open(..., dir_fd=...)` get past an audit hook.

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

from afina.config import RecipeError

INSIDE = "/sandbox"  # the program's working folder and home inside bubblewrap


class SandboxUnavailable(RecipeError):
    """pass@1 needs bubblewrap here, or `eval.sandbox.allow_weak: true`; the message says how."""


# The harness the child runs: drop privileges, install the guard, then run the program.
# It reads the program from program.py in its working folder.
_HARNESS = r"""
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
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
        if writing and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]} outside the sandbox folder is not allowed")
    elif event in WRITE_EVENTS and args and not all(
            inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the sandbox folder is not allowed")
sys.addaudithook(guard)
del guard
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


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


def _nobody() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _system_binds() -> list[str]:
    """Read-only /usr and the Python installation; /bin, /lib... as the host has them (links or folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    python = os.path.realpath(sys.executable)
    for place in {os.path.realpath(sys.base_prefix), os.path.dirname(python)}:
        if not place.startswith("/usr/"):
            args += ["--ro-bind", place, place]
    return args


def bubblewrap_command(folder: Path) -> list[str]:
    """The command prefix that runs a program under bubblewrap with `folder` as its only writable place."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    root = os.getuid() == 0
    # As root, bwrap needs no user namespace; the program then runs as `nobody` (setpriv drops every
    # capability and sets no_new_privs), so RLIMIT_NPROC counts nobody's processes, not root's.
    # As another user, a user namespace keeps that user's id, without capabilities.
    namespaces = (
        ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        if root
        else ["--unshare-all", "--cap-drop", "ALL"]
    )
    command = [
        bwrap,
        *namespaces,
        *_system_binds(),
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--bind",
        str(folder),
        INSIDE,
        "--chdir",
        INSIDE,
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--",
    ]
    if root:
        uid, gid = _nobody()
        command += [
            shutil.which("setpriv") or "/usr/bin/setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
    return command


@functools.lru_cache(maxsize=1)
def bubblewrap_problem() -> str | None:
    """Why bubblewrap cannot sandbox programs here, or None when it works (checked once per process)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (`bwrap`) is not installed"
    if os.getuid() == 0 and shutil.which("setpriv") is None:
        return "`setpriv` (util-linux) is not installed, needed to drop root inside the sandbox"
    folder = Path(tempfile.mkdtemp(prefix="afina-sandbox-check-"))
    try:
        if os.getuid() == 0:
            os.chown(folder, *_nobody())
        probe = [*bubblewrap_command(folder), os.path.realpath(sys.executable), "-I", "-S", "-c", "pass"]
        done = subprocess.run(probe, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap failed to start: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip()[-500:] or f"exit status {done.returncode}"
        return f"bubblewrap is installed but cannot create a sandbox here: {reason}"
    return None


def require_sandbox(allow_weak: bool) -> bool:
    """True when bubblewrap will be used; False (weak) only when allowed; else SandboxUnavailable."""
    problem = bubblewrap_problem()
    if problem is None:
        return True
    if allow_weak:
        return False
    raise SandboxUnavailable(
        f"pass@1 runs code the model wrote, which needs an OS-level sandbox, and {problem}. Install bubblewrap "
        "(Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`; where user namespaces "
        "are disabled, enable them: `sysctl kernel.unprivileged_userns_clone=1`), or accept a Python-level guard "
        "that determined code can escape with `eval.sandbox.allow_weak=true` (a recipe's eval.sandbox section or "
        "an override on the command line)."
    )


def _user_processes() -> int:
    """Processes (threads) the current user runs now: RLIMIT_NPROC counts them all, not only the sandbox's."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _limit_child(time_limit_s: float, memory_mb: int, processes: int) -> None:  # runs in the child, before exec
    import resource

    cpu = max(1, int(time_limit_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Counted per user: root is exempt, so the program runs as `nobody` when started as root.
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def run_program(
    source: str, time_limit_s: float = 10.0, memory_mb: int = 512, allow_weak: bool = False
) -> SandboxResult:
    """Run Python source in the sandbox; it passes when it exits with status 0 in time.

    Raises SandboxUnavailable when bubblewrap cannot run here and `allow_weak` is False.
    """
    strong = require_sandbox(allow_weak)
    folder = Path(tempfile.mkdtemp(prefix="afina-sandbox-"))
    try:
        (folder / "program.py").write_text(source, encoding="utf-8")
        (folder / "harness.py").write_text(_HARNESS, encoding="utf-8")
        if os.getuid() == 0:  # the program runs as nobody: it must own its folder
            uid, gid = _nobody()
            for path in (folder, folder / "program.py", folder / "harness.py"):
                os.chown(path, uid, gid)
        home = INSIDE if strong else str(folder)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        if strong:
            command = [*bubblewrap_command(folder), os.path.realpath(sys.executable), "-I", "-S", "harness.py"]
            processes = 64 + (0 if os.getuid() == 0 else _user_processes())
        else:
            command = [*network_isolation(), sys.executable, "-I", "-S", "harness.py"]
            processes = 64
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills every descendant
            preexec_fn=functools.partial(_limit_child, time_limit_s, memory_mb, processes),
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
