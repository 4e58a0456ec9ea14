"""The pass@1 sandbox contains what generated code may do: loops, fork bombs, huge allocations, writes,
and the escapes a Python-level guard misses (native spawns, writes through directory descriptors)."""

import os
import socket
import sys
import time

import pytest

from afina.eval import sandbox
from afina.eval.sandbox import SandboxUnavailable, extract_code, network_isolation, program_for_task, run_program

# The escape tests need the OS-level sandbox; .ci/run installs bubblewrap.
needs_bwrap = pytest.mark.skipif(
    sandbox.bubblewrap_problem() is not None, reason=f"bubblewrap unusable here: {sandbox.bubblewrap_problem()}"
)


@pytest.fixture
def host_home(tmp_path):
    """A user's home as a laptop has it: world-readable folders (Debian's default 0755) with a secret inside,
    and a folder anyone may write to; the program is told where both are."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("the user's API token 8c1f")
    outside = tmp_path / "shared"
    outside.mkdir()
    for path in (tmp_path, home):
        path.chmod(0o755)
    (home / "secret.txt").chmod(0o644)
    outside.chmod(0o777)
    return home, outside


def test_passing_and_failing_programs():
    assert run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", 10, 256).status == "passed"
    result = run_program("assert 1 + 1 == 3\n", 10, 256)
    assert result.status == "failed" and "AssertionError" in result.stderr_tail


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", time_limit_s=2, memory_mb=256)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - start < 20  # killed, not left running


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    os.fork()\n"
    result = run_program(bomb, time_limit_s=3, memory_mb=256)
    assert not result.passed
    # No process of the bomb survives it.
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("harness.py")]
    assert left == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_huge_allocation_hits_the_memory_limit():
    result = run_program("x = bytearray(8 * 2**30)\nprint(len(x))\n", time_limit_s=10, memory_mb=256)
    assert result.status == "memory" and not result.passed


def test_writes_outside_the_folder_are_refused(tmp_path):
    target = tmp_path / "user_file.txt"
    target.write_text("the user's data")
    for program in (
        f"open({str(target)!r}, 'w').write('overwritten')",
        f"import os\nos.remove({str(target)!r})",
        f"import pathlib\npathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')",
    ):
        assert not run_program(program, 10, 256).passed
    assert target.read_text() == "the user's data"
    assert not (tmp_path / "new.txt").exists()
    # Its own folder is writable.
    assert run_program(
        "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n", 10, 256
    ).passed


def test_no_network():
    program = (
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\n"
        "s.connect(('1.1.1.1', 80))\n"
    )
    assert not run_program(program, 10, 256).passed
    if network_isolation():  # the kernel lets us: no interface but loopback in its namespace
        listing = "print(open('/proc/net/dev').read())\nassert 'eth' not in open('/proc/net/dev').read()\n"
        assert run_program(listing, 10, 256).passed


def test_task_program_and_code_extraction():
    answer = "Here you go:\n```python\ndef sq(x):\n    return x * x\n```\nDone."
    code = extract_code(answer)
    assert code.strip() == "def sq(x):\n    return x * x"
    assert run_program(program_for_task(code, ["assert sq(3) == 9"]), 10, 256).passed
    assert not run_program(program_for_task(code, ["assert sq(3) == 10"]), 10, 256).passed


@needs_bwrap
def test_a_native_spawn_cannot_reach_the_host(host_home):
    """_posixsubprocess.fork_exec starts /bin/sh past any audit hook; the shell still sees no host file."""
    home, outside = host_home
    if sys.version_info[:2] not in ((3, 11), (3, 12), (3, 13)):
        pytest.skip("fork_exec's signature is version-specific")
    shell = (
        f"cat {home}/secret.txt > {outside}/stolen.txt; echo escaped > {outside}/shell.txt; echo spawned > spawned.txt"
    )
    program = f"""
import _posixsubprocess, os, time
args = [b"/bin/sh", b"-c", {shell!r}.encode()]
pid = _posixsubprocess.fork_exec(args, [b"/bin/sh"], True, (), None, None, -1, -1, -1, -1, -1, -1,
                                 *os.pipe(), False, False, -1, None, None, None, -1, None, False)
os.waitpid(pid, 0)
assert open("spawned.txt").read() == "spawned\\n"   # the shell ran, inside the sandbox
"""
    result = run_program(program, 10, 256)
    assert result.passed, result.stderr_tail  # the spawn itself works: it is the sandbox that contains it
    assert not (outside / "shell.txt").exists() and not (outside / "stolen.txt").exists()


@needs_bwrap
def test_a_write_through_a_directory_descriptor_stays_inside(host_home):
    home, outside = host_home
    program = f"""
import os
fd = os.open({str(outside)!r}, os.O_RDONLY)
out = os.open("escaped.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
os.write(out, b"written outside")
"""
    assert not run_program(program, 10, 256).passed
    assert list(outside.iterdir()) == []


@needs_bwrap
def test_the_host_users_files_and_etc_passwd_cannot_be_read(host_home):
    home, _ = host_home
    host_passwd = open("/etc/passwd").read().splitlines()[0]
    for path in (home / "secret.txt", "/etc/passwd", "/root/.bashrc", "/work"):
        program = (
            f"import os, sys\np = {str(path)!r}\n"
            "print(os.listdir(p) if os.path.isdir(p) else open(p).read(), file=sys.stderr)\n"
        )
        result = run_program(program, 10, 256)
        assert not result.passed, (path, result.stderr_tail)
        assert "8c1f" not in result.stderr_tail and host_passwd not in result.stderr_tail


@needs_bwrap
def test_subprocesses_run_only_inside_and_the_host_network_is_unreachable(host_home):
    _, outside = host_home
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        program = f"""
import _socket
s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
s.settimeout(3)
s.connect(("127.0.0.1", {port}))
s.sendall(b"exfiltrated")
"""
        assert not run_program(program, 10, 256).passed
        with pytest.raises(TimeoutError):
            listener.accept()
    # Its own PID namespace: it sees only its own few processes, never the host's.
    ps = "import os, sys\nprint(os.getpid(), len([p for p in os.listdir('/proc') if p.isdigit()]), file=sys.stderr)\n"
    pid, count = map(int, run_program(ps + "raise SystemExit(1)\n", 10, 256).stderr_tail.split())
    assert pid < 10 and count < 10


def test_without_bubblewrap_pass_at_1_refuses_unless_allowed(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox.bubblewrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"eval\.sandbox\.allow_weak=true.*|apt-get install bubblewrap"):
            run_program("assert True", 10, 256)
        assert run_program("assert 1 + 1 == 2", 10, 256, allow_weak=True).passed
    finally:
        monkeypatch.undo()
        sandbox.bubblewrap_problem.cache_clear()
