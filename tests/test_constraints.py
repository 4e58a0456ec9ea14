"""The lock: constraints.txt pins what the suite passed with, and the environment running it holds those versions."""

import importlib.metadata as md
import os
import re
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"
# The releases that broke main overnight before there was a lock (peft 0.22 and bitsandbytes 0.50), and their
# neighbours in the training stack.
GUARDED = ("peft", "transformers", "bitsandbytes", "accelerate", "safetensors", "tokenizers")


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def test_the_lock_pins_the_training_stack_and_leaves_torch_to_the_makefile():
    pins = locked_versions()
    assert all(name in pins for name in GUARDED), [name for name in GUARDED if name not in pins]
    assert "torch" not in pins and "afina" not in pins


@pytest.mark.skipif(
    bool(os.environ.get("AFINA_UNLOCKED")), reason="make test-latest and test-lowest run past the lock on purpose"
)
def test_the_installed_training_stack_is_the_locked_one():
    """`make install` and CI install with -c constraints.txt; a mismatch means this environment was set up
    another way (run `make install`, or `pip install -c constraints.txt -e .[test]`)."""
    pins = locked_versions()
    moved = {name: (pins[name], md.version(name)) for name in GUARDED if md.version(name) != pins[name]}
    assert not moved, f"installed versions differ from constraints.txt (locked, installed): {moved}"
