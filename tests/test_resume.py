"""Checkpoints survive a crash: a run killed with SIGKILL and resumed gives the same loss curve."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from afina.pipeline import prepare
from afina.rundir import RunDir
from afina.train.checkpoint import list_checkpoints
from afina.pipeline import train

from conftest import support_rows, write_jsonl

STEPS = 40


def recipe_file(tmp_path, tiny_model_dir, name):
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {tiny_model_dir}\ndata:\n  path: rows.jsonl\n"
        f"training:\n  max_steps: {STEPS}\n  batch_size: 2\n  learning_rate: 0.003\n  precision: fp32\n"
        "  log_every: 1\n  save_every: 2\n  eval_every: 10\n  tensorboard: false\n  plots: false\n"
    )
    return path


def losses(run_root):
    return [json.loads(l)["loss"] for l in (run_root / "metrics.jsonl").read_text().splitlines()]


def start_training(path, *extra):
    return subprocess.Popen([sys.executable, "-m", "afina", "train", str(path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(folder, proc, at_least=2, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list_checkpoints(folder)
        if found and int(found[-1].name.split("-")[1]) >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint was seen: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, tiny_model_dir):
    from afina.config import load_recipe

    reference = load_recipe(recipe_file(tmp_path, tiny_model_dir, "reference"))
    prepare(reference)
    train(reference, progress=False)

    path = recipe_file(tmp_path, tiny_model_dir, "killed")
    killed = load_recipe(path)
    prepare(killed)
    proc = start_training(path)
    wait_for_checkpoint(RunDir(killed.run_dir).root / "checkpoints", proc, at_least=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(losses(RunDir(killed.run_dir).root)) < STEPS  # it really was cut short

    resumed = subprocess.run([sys.executable, "-m", "afina", "train", str(path), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = RunDir(killed.run_dir).read_manifest()["train"]
    assert manifest["resumed_from"] and manifest["steps"] == STEPS

    expected, got = losses(RunDir(reference.run_dir).root), losses(RunDir(killed.run_dir).root)
    assert len(got) == len(expected) == STEPS
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir):
    from afina.config import load_recipe

    path = recipe_file(tmp_path, tiny_model_dir, "stopped")
    recipe = load_recipe(path)
    prepare(recipe)
    proc = start_training(path)
    folder = RunDir(recipe.run_dir).root / "checkpoints"
    wait_for_checkpoint(folder, proc, at_least=2)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGTERM received: checkpoint saved at step" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    step = int(stderr.split("checkpoint saved at step ")[1].split(";")[0])
    assert list_checkpoints(folder)[-1].name == f"step-{step:08d}"


def test_resume_without_checkpoint_is_explained(tiny_recipe):
    recipe = tiny_recipe()
    prepare(recipe)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(recipe, progress=False, resume=True)
