"""QLoRA on CPUs of every kind: bitsandbytes' AVX512-BF16 inference packing never reaches training.

On a CPU with AVX512-BF16 (a Xeon with AMX), bitsandbytes 0.49+ repacks a 4-bit weight in place the first
time its layer runs in eval mode without gradients, which is what validation does; training then went on
through a kernel without an autograd formula (or crashed on shapes whose output size is not a multiple of
32). These tests force the layers' AVX512-BF16 switch on, whatever this machine's CPU has, so the path is
tested on AVX2-only CPUs too: the packing itself is plain torch code, only its matmul kernel needs the
instruction set.
"""

import pytest
import torch

from afina.config import MethodConfig
from afina.pipeline import prepare, train
from afina.rundir import RunDir
from afina.train.methods import apply_method, keep_4bit_layout_trainable, load_for_method

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def avx512_bf16_forced(monkeypatch):
    """Every Linear4bit built from here on believes the CPU has AVX512-BF16 (bitsandbytes reads the flag
    in the layer's constructor)."""
    import bitsandbytes.nn.modules as modules

    if not hasattr(modules, "has_avx512bf16"):
        pytest.skip("this bitsandbytes has no AVX512-BF16 inference packing")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)


def four_bit_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def qlora_model(model_dir, dtype: str):
    torch.manual_seed(0)  # the same LoRA start values for every model built here
    method = MethodConfig(type="qlora", r=4)
    return apply_method(load_for_method(str(model_dir), method, torch.device("cpu"), dtype=dtype), method)


def lora_gradients(model, input_ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_after_validation_every_4bit_layer_trains_as_a_fresh_one(tiny_model_dir, avx512_bf16_forced, dtype):
    input_ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    fresh = lora_gradients(qlora_model(tiny_model_dir, dtype), input_ids)

    model = qlora_model(tiny_model_dir, dtype)
    layers = four_bit_layers(model)
    assert layers and all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a validation pass, as the loop runs it
        model(input_ids=input_ids, labels=input_ids)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    after = lora_gradients(model, input_ids)
    assert after.keys() == fresh.keys()
    for name in fresh:
        torch.testing.assert_close(after[name], fresh[name], rtol=0, atol=0, msg=name)


def test_a_weight_already_repacked_for_inference_is_unpacked(tiny_model_dir, avx512_bf16_forced):
    """A model that ran inference before afina saw it (packed in place) gets its trainable layout back, the
    same 4-bit weights as before up to the packing's own loss (it stores the block scales in bfloat16)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    model = qlora_model(tiny_model_dir, "float32")
    layer = four_bit_layers(model)[0]
    before = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert layer.weight.quant_state.packing_format_for_cpu
    assert keep_4bit_layout_trainable(model) >= len(four_bit_layers(model))
    assert not layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(
        dequantize_4bit(layer.weight.data, layer.weight.quant_state), before, rtol=1e-2, atol=1e-3
    )


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_qlora_with_validation_trains_the_same_whatever_the_cpu_flag_says(tiny_recipe, monkeypatch, weights):
    """The whole run (validation every 2 steps) with bitsandbytes told the CPU has AVX512-BF16 gives the
    same losses and adapter as the run with it told it has not: the flag never reaches training."""
    import bitsandbytes.nn.modules as modules

    if not hasattr(modules, "has_avx512bf16"):
        pytest.skip("this bitsandbytes has no AVX512-BF16 inference packing")
    runs = {}
    for flag in (False, True):
        monkeypatch.setattr(modules, "has_avx512bf16", lambda flag=flag: flag)
        recipe = tiny_recipe(
            "method.type=qlora",
            f"model.dtype={weights}",
            "training.max_steps=4",
            "training.eval_every=2",
            "training.precision=bf16",
            "training.tensorboard=false",
            "training.plots=false",
            f"name=flag-{flag}",
        )
        prepare(recipe)
        summary = train(recipe, progress=False)
        from safetensors.torch import load_file

        runs[flag] = (summary, load_file(str(RunDir(recipe.run_dir).adapter / "adapter_model.safetensors")))
    (plain, plain_adapter), (forced, forced_adapter) = runs[False], runs[True]
    assert forced["val_loss_after"] == pytest.approx(plain["val_loss_after"], rel=1e-6)
    assert forced_adapter.keys() == plain_adapter.keys() and plain_adapter
    for name in plain_adapter:
        torch.testing.assert_close(forced_adapter[name], plain_adapter[name], msg=name)


def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


needs_avx512_bf16 = pytest.mark.skipif(
    "avx512_bf16" not in cpu_flags(), reason="this CPU has no AVX512-BF16 (lscpu: avx512_bf16)"
)


@needs_avx512_bf16
def test_on_a_cpu_with_avx512_bf16_the_flag_is_bitsandbytes_own_and_training_turns_it_off(tiny_model_dir):
    """Where the instruction set is real, bitsandbytes' layers ask for the packing by themselves (so the
    forced flag above models a real path) and afina's QLoRA model has it off, before and after validation."""
    import bitsandbytes.nn.modules as modules

    if not hasattr(modules, "has_avx512bf16"):
        pytest.skip("this bitsandbytes has no AVX512-BF16 inference packing")
    assert modules.has_avx512bf16()
    model = qlora_model(tiny_model_dir, "bfloat16")
    layers = four_bit_layers(model)
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
