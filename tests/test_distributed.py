"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from afina.config import load_recipe
from afina.pipeline import prepare, train
from afina.rundir import RunDir
from conftest import support_rows, write_jsonl


def recipe_text(tmp_path, tiny_model_dir, name, grad_accum, strategy="ddp", method="lora", extra="", precision="fp32"):
    """precision bf16 also forces bfloat16 weights, whatever `auto` would pick on this CPU."""
    dtype = "bfloat16" if precision == "bf16" else "float32"
    return (
        f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {tiny_model_dir}\n  dtype: {dtype}\n"
        f"data:\n  path: rows.jsonl\nmethod:\n  type: {method}\n"
        f"training:\n  max_steps: 6\n  batch_size: 2\n  grad_accum: {grad_accum}\n  learning_rate: 0.003\n"
        f"  precision: {precision}\n  log_every: 1\n  tensorboard: false\n  plots: false\n  distributed: {strategy}\n"
        f"  max_grad_norm: 0.5\n{extra}"
    )


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def curve(recipe):
    return [json.loads(line)["loss"] for line in RunDir(recipe.run_dir).metrics.read_text().splitlines()]


@pytest.mark.parametrize(
    "strategy, method, precision",
    [
        ("ddp", "lora", "fp32"),
        ("fsdp", "lora", "fp32"),
        ("fsdp", "full", "fp32"),
        ("ddp", "lora", "bf16"),
        ("fsdp", "lora", "bf16"),
    ],
)
def test_two_processes_match_one_process(tmp_path, tiny_model_dir, strategy, method, precision):
    """DDP and FSDP (sharded layers; full fine-tuning also has whole embeddings) equal one process, with
    float32 weights and with bfloat16 weights and compute (either may be what `auto` picks on a CPU)."""
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    single = tmp_path / "single.yaml"
    single.write_text(recipe_text(tmp_path, tiny_model_dir, "single", 2, strategy, method, precision=precision))
    double = tmp_path / "double.yaml"
    double.write_text(recipe_text(tmp_path, tiny_model_dir, "double", 1, strategy, method, precision=precision))
    # bfloat16: the two processes' halves of a batch and the summed gradients round apart (2^-8 relative).
    rel, atol = (1e-5, 1e-5) if precision == "fp32" else (2e-2, 2e-3)
    one = load_recipe(single)
    prepare(one)
    train(one, progress=False)
    two = load_recipe(double)
    prepare(two)

    torchrun("-m", "afina", "train", str(double))
    summary = RunDir(two.run_dir).read_manifest()["train"]
    assert summary["processes"] == 2 and summary["distributed"] == strategy

    assert len(curve(two)) == 6
    assert curve(two) == pytest.approx(curve(one), rel=rel)

    # The saved result (gathered from the shards under FSDP) equals the single process's: every tensor.
    out = "adapter" if method == "lora" else "model"
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    saved_one = load_file(str(RunDir(one.run_dir).root / out / name))
    saved_two = load_file(str(RunDir(two.run_dir).root / out / name))
    assert saved_one and saved_one.keys() == saved_two.keys()
    for key in saved_one:
        torch.testing.assert_close(saved_two[key], saved_one[key], rtol=max(rel, 1e-4), atol=atol)

    if strategy == "fsdp":
        # Each process holds about half of the weights, gradients and optimizer state (counted tensor by tensor).
        held_one = RunDir(one.run_dir).read_manifest()["train"]["held_bytes_per_process"]
        held_two = summary["held_bytes_per_process"]
        assert sum(held_two.values()) <= 0.6 * sum(held_one.values())
        assert (
            held_two["parameters"] <= 0.6 * held_one["parameters"]
            and held_two["optimizer"] <= 0.6 * held_one["optimizer"]
        )
        # Checkpoints are sharded: a file per process, no gathered weights.
        last = sorted((RunDir(two.run_dir).root / "checkpoints").glob("step-*"))[-1]
        assert len(list((last / "shards").glob("*.distcp"))) == 2 and not (last / "trainable.safetensors").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_never_materialises_a_whole_tensor_in_one_process(tmp_path, tiny_model_dir, method):
    """Built on the meta device, each process only ever touches its own rows of the largest tensor (the
    embedding); building the model whole and then sharding (the path before) touches all of it, which the
    same probe sees, so the probe can fail."""
    write_jsonl(tmp_path / "rows.jsonl", support_rows(4, 2))
    path = tmp_path / "fsdp.yaml"
    path.write_text(recipe_text(tmp_path, tiny_model_dir, "fsdp", 1, "fsdp", method))
    prepare(load_recipe(path))
    probe = str(Path(__file__).parent / "fsdp_build_probe.py")
    hows = ["meta", "whole"] if method == "full" else ["meta"]
    for how in hows:
        torchrun(probe, str(path), str(tmp_path / how), how, timeout=300)
    for rank in (0, 1):
        meta = json.loads((tmp_path / "meta" / f"rank-{rank}.json").read_text())
        assert meta["largest_touched"] <= meta["largest_parameter"] // 2
        if method == "full":
            whole = json.loads((tmp_path / "whole" / f"rank-{rank}.json").read_text())
            assert whole["largest_touched"] == whole["largest_parameter"]
            assert meta["local_bytes"] == whole["local_bytes"]  # the same shards, however they were built


def test_fsdp_resumes_from_its_sharded_checkpoint(tmp_path, tiny_model_dir):
    """Two processes, checkpoints every 2 steps; the run resumed from step 4 continues the same loss curve."""
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    path = tmp_path / "fsdp.yaml"
    path.write_text(
        recipe_text(
            tmp_path,
            tiny_model_dir,
            "fsdp",
            1,
            "fsdp",
            "full",
            "  save_every: 2\n  eval_every: 6\n  keep_checkpoints: 3\n",
        )
    )
    recipe = load_recipe(path)
    prepare(recipe)
    torchrun("-m", "afina", "train", str(path))
    uninterrupted = curve(recipe)
    checkpoints = RunDir(recipe.run_dir).root / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000006")
    torchrun("-m", "afina", "train", str(path), "--resume")
    summary = RunDir(recipe.run_dir).read_manifest()["train"]
    assert summary["resumed_from"].endswith("step-00000004") and summary["steps"] == 6
    assert curve(recipe) == pytest.approx(uninterrupted, rel=1e-6)
    # One process cannot resume it: the message says how it was written.
    with pytest.raises(ValueError, match="written by an FSDP run"):
        train(recipe, progress=False, resume=True)


def test_an_fsdp_checkpoint_is_not_loaded_into_an_unsharded_run():
    from afina.train.checkpoint import load_optimizer_state

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    fsdp_style = {
        "state": {"weight": {"step": torch.tensor(1.0)}},
        "param_groups": optimizer.state_dict()["param_groups"],
    }
    with pytest.raises(ValueError, match="written by an FSDP run"):
        load_optimizer_state(model, optimizer, fsdp_style)
    load_optimizer_state(model, optimizer, optimizer.state_dict())  # its own kind loads


@pytest.mark.parametrize("strategy, method", [("ddp", "lora"), ("fsdp", "full")])
def test_every_collective_takes_a_tensor_on_its_backends_device(tmp_path, tiny_model_dir, strategy, method):
    """Every collective of a two-process run (DDP with gradient accumulation; FSDP) gets tensors on the device
    its backend takes. Under DDP the gradients are summed once per optimizer step, not once per micro-batch:
    the first micro-batch of each step runs under no_sync."""
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    path = tmp_path / "probe.yaml"
    path.write_text(recipe_text(tmp_path, tiny_model_dir, "probe", 2, strategy, method))
    prepare(load_recipe(path))
    torchrun(str(Path(__file__).parent / "collective_probe.py"), str(path), str(tmp_path / "seen"))
    for rank in (0, 1):
        seen = json.loads((tmp_path / "seen" / f"rank-{rank}.json").read_text())
        assert seen, "no collective was seen"
        wrong = [s for s in seen if s["device"] != s["expected"]]
        assert not wrong, wrong[:5]
        if strategy == "ddp":
            trainable = json.loads((tmp_path / "runs" / "probe" / "manifest.json").read_text())["train"][
                "trainable_parameters"
            ]
            gradient_sums = [s for s in seen if s["op"] == "all_reduce" and s["numel"] == trainable]
            assert len(gradient_sums) == 6  # one bucket per optimizer step, for 12 micro-batches per process


def test_sharded_resume_runs_no_planted_code_and_skips_a_damaged_shard(tmp_path, tiny_model_dir):
    """An FSDP checkpoint is data: a state.pt or a DCP .metadata whose pickle would run a command (checksums
    rewritten to match, as whoever can write the folder could) is refused without running it; a shard cut
    short makes --resume fall back to the newest intact checkpoint, naming the damaged file."""
    import pickle

    from afina.train.checkpoint import write_checksums

    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    path = tmp_path / "fsdp.yaml"
    extra = "  save_every: 2\n  eval_every: 6\n  keep_checkpoints: 3\n"
    path.write_text(recipe_text(tmp_path, tiny_model_dir, "fsdp", 1, "fsdp", "lora", extra))
    recipe = load_recipe(path)
    prepare(recipe)
    torchrun("-m", "afina", "train", str(path))
    uninterrupted = curve(recipe)
    checkpoints = RunDir(recipe.run_dir).root / "checkpoints"
    newest = checkpoints / "step-00000006"
    assert json.loads((newest / "checksums.json").read_text()).keys() >= {"state.pt", "shards/.metadata"}
    backup = tmp_path / "backup"
    shutil.copytree(newest, backup)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for planted in ("state.pt", "shards/.metadata"):
        (newest / planted).write_bytes(pickle.dumps({"payload": Exploit()}))
        write_checksums(newest)
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            + ["-m", "afina", "train", str(path), "--resume"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode != 0 and not marker.exists(), planted
        assert "pickle" in out.stderr.lower() or "not allowed" in out.stderr, out.stderr[-2000:]
        shutil.rmtree(newest)
        shutil.copytree(backup, newest)

    shard = sorted((newest / "shards").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = torchrun("-m", "afina", "train", str(path), "--resume")
    assert f"checkpoint {newest} is damaged: shards/{shard.name} is" in out.stderr
    assert "resuming from step-00000004" in out.stderr
    assert RunDir(recipe.run_dir).read_manifest()["train"]["resumed_from"].endswith("step-00000004")
    assert curve(recipe) == pytest.approx(uninterrupted, rel=1e-6)


def test_afina_train_starts_torchrun_itself(tmp_path, tiny_model_dir):
    """`afina train RECIPE --nproc-per-node 2`, as a user types it: two processes, the same loss curve as
    the torchrun command it replaces; several nodes without a rendezvous endpoint is a clear error."""
    write_jsonl(tmp_path / "rows.jsonl", support_rows(8, 4))
    path = tmp_path / "launched.yaml"
    path.write_text(recipe_text(tmp_path, tiny_model_dir, "launched", 1))
    recipe = load_recipe(path)
    prepare(recipe)
    afina = [sys.executable, "-m", "afina", "train", str(path)]
    out = subprocess.run([*afina, "--nproc-per-node", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting 2 processes with torchrun" in out.stderr
    summary = RunDir(recipe.run_dir).read_manifest()["train"]
    assert summary["processes"] == 2 and summary["distributed"] == "ddp"
    launched = curve(recipe)
    torchrun("-m", "afina", "train", str(path))
    assert launched == pytest.approx(curve(recipe), rel=1e-6)

    bad = subprocess.run([*afina, "--nproc-per-node", "2", "--nnodes", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--rdzv-endpoint" in bad.stderr


def test_the_launch_passes_torchrun_its_rendezvous():
    from afina.train.launch import Launch

    assert Launch(4).torchrun_args() == ["--standalone", "--nproc_per_node=4"]
    assert Launch(8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500").torchrun_args() == [
        "--nproc_per_node=8",
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29500",
    ]
