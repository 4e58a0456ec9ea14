"""Checkpoints survive a crash: a run killed with SIGKILL and resumed gives the same loss curve."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from afina.pipeline import prepare, train
from afina.rundir import RunDir
from afina.train.checkpoint import list_checkpoints
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
    return [json.loads(line)["loss"] for line in (run_root / "metrics.jsonl").read_text().splitlines()]


def start_training(path, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "afina", "train", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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

    resumed = subprocess.run(
        [sys.executable, "-m", "afina", "train", str(path), "--resume"], capture_output=True, text=True, timeout=300
    )
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


def _trained_with_checkpoints(tiny_recipe, steps=6):
    recipe = tiny_recipe(
        f"training.max_steps={steps}",
        "training.save_every=2",
        "training.keep_checkpoints=3",
        "training.tensorboard=false",
        "training.plots=false",
    )
    prepare(recipe)
    train(recipe, progress=False)
    return recipe, list_checkpoints(RunDir(recipe.run_dir).root / "checkpoints")


def test_resume_never_runs_code_from_a_planted_state_pt(tiny_recipe, tmp_path):
    """A state.pt whose pickle would run a command (with checksums rewritten to match) is refused, not run."""
    from afina.train.checkpoint import write_checksums

    recipe, found = _trained_with_checkpoints(tiny_recipe, steps=2)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    import pickle

    newest = found[-1]
    (newest / "state.pt").write_bytes(pickle.dumps({"step": 2, "payload": Exploit()}))
    write_checksums(newest)  # an attacker who can write the folder can also rewrite the checksums
    with pytest.raises(
        FileNotFoundError, match=r"no intact checkpoint.*state\.pt|no intact checkpoint.*cannot be read"
    ):
        train(recipe, progress=False, resume=True)
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tiny_recipe, capsys):
    recipe, found = _trained_with_checkpoints(tiny_recipe)
    assert [p.name for p in found] == ["step-00000002", "step-00000004", "step-00000006"]
    weights = found[-1] / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    state = found[-2] / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    capsys.readouterr()
    train(recipe, progress=False, resume=True)
    err = capsys.readouterr().err
    assert "step-00000006" in err and "trainable.safetensors is" in err
    assert "step-00000004" in err and "state.pt is" in err
    assert "resuming from step-00000002" in err
    manifest = RunDir(recipe.run_dir).read_manifest()["train"]
    assert manifest["resumed_from"].endswith("step-00000002") and manifest["steps"] == 6


def test_no_intact_checkpoint_is_a_clear_error_through_the_cli(tmp_path, tiny_model_dir, capsys):
    from afina.cli import main

    path = recipe_file(tmp_path, tiny_model_dir, "broken")
    short = ["training.max_steps=2", "training.eval_every=2"]
    assert main(["prepare", str(path)]) == 0
    assert main(["train", str(path), *short]) == 0
    (state,) = list((tmp_path / "runs" / "broken" / "checkpoints").glob("step-*/state.pt"))
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    code = main(["train", str(path), *short, "--resume"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "no intact checkpoint to resume from" in err and "state.pt is" in err and "without --resume" in err
