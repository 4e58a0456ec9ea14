"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from afina.config import load_recipe
from afina.pipeline import prepare
from afina.rundir import RunDir
from afina.pipeline import train

from conftest import support_rows, write_jsonl


def recipe_text(tmp_path, tiny_model_dir, name, grad_accum, strategy="ddp", method="lora"):
    return (
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {tiny_model_dir}\ndata:\n  path: rows.jsonl\n"
        f"method:\n  type: {method}\n"
        f"training:\n  max_steps: 6\n  batch_size: 2\n  grad_accum: {grad_accum}\n  learning_rate: 0.003\n"
        f"  precision: fp32\n  log_every: 1\n  tensorboard: false\n  plots: false\n  distributed: {strategy}\n"
        "  max_grad_norm: 0.5\n"
    )


@pytest.mark.parametrize("strategy, method", [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "full")])
def test_two_processes_match_one_process(tmp_path, tiny_model_dir, strategy, method):
    """DDP and FSDP (sharded layers; full fine-tuning also has whole embeddings) equal one process."""
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    single = tmp_path / "single.yaml"
    single.write_text(recipe_text(tmp_path, tiny_model_dir, "single", 2, strategy, method))
    double = tmp_path / "double.yaml"
    double.write_text(recipe_text(tmp_path, tiny_model_dir, "double", 1, strategy, method))
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
    summary = RunDir(two.run_dir).read_manifest()["train"]
    assert summary["processes"] == 2 and summary["distributed"] == strategy

    def curve(recipe):
        return [json.loads(l)["loss"] for l in RunDir(recipe.run_dir).metrics.read_text().splitlines()]

    assert len(curve(two)) == 6
    assert curve(two) == pytest.approx(curve(one), rel=1e-5)

    # The saved result (gathered from the shards under FSDP) equals the single process's.
    out = "adapter" if method == "lora" else "model"
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    saved_one = load_file(str(RunDir(one.run_dir).root / out / name))
    saved_two = load_file(str(RunDir(two.run_dir).root / out / name))
    assert saved_one.keys() == saved_two.keys()
    for key in saved_one:
        torch.testing.assert_close(saved_two[key], saved_one[key], rtol=1e-4, atol=1e-5)


def test_an_fsdp_checkpoint_is_not_loaded_into_an_unsharded_run():
    from afina.train.checkpoint import load_optimizer_state

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    fsdp_style = {"state": {"weight": {"step": torch.tensor(1.0)}}, "param_groups": optimizer.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match="written by an FSDP run"):
        load_optimizer_state(model, optimizer, fsdp_style)
    load_optimizer_state(model, optimizer, optimizer.state_dict())  # its own kind loads
