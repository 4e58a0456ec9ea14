"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch."""

import json
import subprocess
import sys

import pytest

from afina.config import load_recipe
from afina.data.prepare import prepare
from afina.rundir import RunDir
from afina.train.loop import train

from conftest import support_rows, write_jsonl


def recipe_text(tmp_path, tiny_model_dir, name, grad_accum):
    return (
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {tiny_model_dir}\ndata:\n  path: rows.jsonl\n"
        f"training:\n  max_steps: 6\n  batch_size: 2\n  grad_accum: {grad_accum}\n  learning_rate: 0.003\n"
        "  precision: fp32\n  log_every: 1\n  tensorboard: false\n  plots: false\n"
    )


def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    single = tmp_path / "single.yaml"
    single.write_text(recipe_text(tmp_path, tiny_model_dir, "single", grad_accum=2))
    double = tmp_path / "double.yaml"
    double.write_text(recipe_text(tmp_path, tiny_model_dir, "double", grad_accum=1))
    one = load_recipe(single)
    prepare(one)
    train(one, progress=False)
    two = load_recipe(double)
    prepare(two)

    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "afina", "train", str(double)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert RunDir(two.run_dir).read_manifest()["train"]["processes"] == 2

    def curve(recipe):
        return [json.loads(l)["loss"] for l in RunDir(recipe.run_dir).metrics.read_text().splitlines()]

    assert len(curve(two)) == 6
    assert curve(two) == pytest.approx(curve(one), rel=1e-5)
