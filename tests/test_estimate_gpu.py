"""`afina estimate --gpu NAME`: memory and time for a GPU the user does not have, from the config alone."""

import pytest
from transformers import LlamaConfig

from afina.cli import main
from afina.config import load_recipe
from afina.pipeline import bundled_recipe_path, estimate
from afina.train.gpus import GPUS, find_gpu, training_flops_per_token

GIB = 2**30


@pytest.fixture(scope="module")
def llama3_8b_shape(tmp_path_factory):
    """Llama 3 8B's config and nothing else: no weights, no tokenizer."""
    path = tmp_path_factory.mktemp("llama3-8b-shape")
    LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ).save_pretrained(path)
    return path


def recipe_for(tmp_path, model, *overrides):
    return load_recipe(None, [f"output_dir={tmp_path / 'runs'}", f"model.name={model}", *overrides])


def test_an_8b_model_on_an_h100_from_its_config_alone(tmp_path, llama3_8b_shape):
    full = estimate(recipe_for(tmp_path, llama3_8b_shape, "method.type=full", "training.max_steps=100"), gpu="h100")
    assert 7.9e9 < full["total_parameters"] < 8.1e9
    memory = full["memory_bytes"]
    assert memory["weights"] / GIB == pytest.approx(full["total_parameters"] * 2 / GIB, rel=0.01)  # bfloat16
    assert full["available_bytes"] == 80 * GIB and full["plan"]["precision"] == "bf16"
    time = full["gpu_time"]
    non_embedding = full["total_parameters"] - 128256 * 4096
    # Full fine-tuning is ~6 FLOPs per weight and token (attention adds a few percent at these lengths).
    assert time["flops_per_token"] == pytest.approx(6 * non_embedding, rel=0.08)
    assert time["expected_seconds"] == pytest.approx(100 * time["seconds_per_step"], rel=1e-3)
    assert time["mfu_assumed"] and time["mfu"] == 0.40
    # Sharded over 8 GPUs each holds about an eighth of the weights, gradients and optimizer state.
    sharded = estimate(
        recipe_for(tmp_path, llama3_8b_shape, "method.type=full"), gpu="h100", processes=8, strategy="fsdp"
    )
    assert sharded["memory_bytes"]["optimizer"] < memory["optimizer"] / 6
    assert sharded["gpu_time"]["tokens_per_s"] == pytest.approx(8 * time["tokens_per_s"], rel=1e-4)


def test_lora_costs_two_thirds_of_full_fine_tuning_per_token():
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    full = training_flops_per_token(config, "full", checkpointing=False, attention_share=0.1)
    assert training_flops_per_token(config, "lora", False, 0.1) == pytest.approx(full * 2 / 3)
    assert training_flops_per_token(config, "full", True, 0.1) == pytest.approx(full * 4 / 3)


def test_the_cli_prints_memory_and_time_for_the_default_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", str(bundled_recipe_path("quickstart")), "--gpu", "h100", "--mfu", "0.3"]) in (0, None)
    out = capsys.readouterr().out
    assert "of 80.0 GiB: fits" in out
    assert "time on NVIDIA H100 SXM 80GB (an estimate" in out and "30% MFU, as given" in out


def test_an_unknown_gpu_lists_the_known_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", str(bundled_recipe_path("quickstart")), "--gpu", "b9000"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'b9000'" in err and all(name in err for name in GPUS)
    assert find_gpu("RTX4090").name == "rtx4090"


def test_a_cuda_device_name_finds_its_row():
    from afina.train.gpus import gpu_named

    assert gpu_named("NVIDIA H100 80GB HBM3").name == "h100"
    assert gpu_named("NVIDIA H100 PCIe").name == "h100-pcie"
    assert gpu_named("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
    assert gpu_named("Tesla T4").name == "t4"
    assert gpu_named("NVIDIA A10G") is None and gpu_named("NVIDIA B200") is None
