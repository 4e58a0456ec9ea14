"""The pass@1 sandbox contains what generated code may do: loops, fork bombs, huge allocations, writes."""

import os
import time

from afina.eval.sandbox import extract_code, network_isolation, program_for_task, run_program


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
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n", 10, 256).passed


def test_no_network():
    program = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n"
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
