"""model.dtype (weights in bfloat16 beside float32 adapters / a float32 master copy) and training.optimizer."""

import copy
import types

import pytest
import torch

from afina.config import MethodConfig
from afina.device import resolve_weight_dtype
from afina.pipeline import prepare, train
from afina.train.methods import apply_method, load_for_method
from afina.train.optim import MasterWeights, build_optimizer, state_bytes


def optimizer_settings(name="adamw", lr=1e-2):
    return types.SimpleNamespace(optimizer=name, learning_rate=lr, weight_decay=0.0)


def test_a_bfloat16_base_halves_the_frozen_weights_and_keeps_the_adapter_float32(tiny_model_dir):
    method = MethodConfig(type="lora", r=4)
    fp32 = apply_method(load_for_method(str(tiny_model_dir), method, torch.device("cpu")), method)
    bf16 = apply_method(load_for_method(str(tiny_model_dir), method, torch.device("cpu"), dtype="bfloat16"), method)

    def frozen_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

    assert {p.dtype for p in bf16.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    assert 2 * frozen_bytes(bf16) == frozen_bytes(fp32)


def test_auto_weight_dtype_follows_the_compute_precision():
    cpu = torch.device("cpu")
    assert resolve_weight_dtype("auto", "fp32", cpu) == "float32"
    assert resolve_weight_dtype("float16", "fp32", cpu) == "float16"  # an explicit choice is kept
    from afina.device import bf16_is_fast

    assert resolve_weight_dtype("auto", "bf16", cpu) == ("bfloat16" if bf16_is_fast(cpu) else "float32")


def test_bfloat16_weight_lora_lowers_validation_loss_like_the_float32_base(tiny_recipe):
    results = {}
    for dtype in ("float32", "bfloat16"):
        recipe = tiny_recipe(
            f"model.dtype={dtype}",
            "training.precision=bf16",
            "training.max_steps=12",
            "training.tensorboard=false",
            "training.plots=false",
            f"name={dtype}",
        )
        prepare(recipe)
        results[dtype] = train(recipe, progress=False)
    fp32, bf16 = results["float32"], results["bfloat16"]
    assert bf16["val_loss_after"] < bf16["val_loss_before"] - 0.5
    # Under bf16 autocast both runs multiply in bfloat16; what differs is the rounding of the frozen weights
    # (2^-9 relative) and so of the start loss: both the start and the end agree to 1%.
    assert bf16["val_loss_before"] == pytest.approx(fp32["val_loss_before"], rel=0.01)
    assert bf16["val_loss_after"] == pytest.approx(fp32["val_loss_after"], rel=0.01)


def test_master_weights_keep_updates_that_bfloat16_rounds_away():
    """An update of 1e-4 on a weight of 1.0 is below bfloat16's half step there (2^-8): plain bfloat16 never
    moves; through the float32 master copy the 50 updates add up."""

    def trained(optimizer_for):
        weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
        optimizer = optimizer_for([{"params": [weight]}])
        for _ in range(50):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
            optimizer.zero_grad()
        return weight

    plain = trained(lambda groups: torch.optim.SGD(groups, lr=1e-4))
    master = trained(
        lambda groups: build_optimizer(
            groups, types.SimpleNamespace(optimizer="adamw", learning_rate=1e-4, weight_decay=0.0)
        )
    )
    assert torch.equal(plain, torch.ones(8, dtype=torch.bfloat16))
    assert master.dtype == torch.bfloat16
    torch.testing.assert_close(master.float(), torch.full((8,), 1 - 50e-4), atol=2e-3, rtol=0)


def test_master_weights_resume_from_their_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(torch.bfloat16)
    x = torch.randn(32, 16, dtype=torch.bfloat16)

    def step(optimizer):
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    optimizer = build_optimizer([{"params": list(model.parameters())}], optimizer_settings())
    assert isinstance(optimizer, MasterWeights)
    step(optimizer)
    saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint on disk would hold it
    saved_weights = [p.detach().clone() for p in model.parameters()]
    step(optimizer)
    expected = [p.detach().clone() for p in model.parameters()]

    with torch.no_grad():
        for p, w in zip(model.parameters(), saved_weights, strict=False):
            p.copy_(w)
    resumed = build_optimizer([{"params": list(model.parameters())}], optimizer_settings())
    resumed.load_state_dict(saved)
    step(resumed)
    for got, want in zip(model.parameters(), expected, strict=False):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"])
def test_optimizer_state_bytes_match_the_estimate(tiny_model_dir, name):
    """The bytes the estimate assigns to each optimizer equal its real state on a tiny model (one full step)."""
    if name != "adamw":
        pytest.importorskip("bitsandbytes" if "8bit" in name else "transformers")
    method = MethodConfig(type="full")
    model = apply_method(load_for_method(str(tiny_model_dir), method, torch.device("cpu")), method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params}], optimizer_settings(name))
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    seen, real = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            # 8-bit state shares one quantization map per optimizer; count every storage once, scalars apart.
            if torch.is_tensor(value) and value.dim() > 0 and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                real += value.numel() * value.element_size()
    shared_maps = 2 * 256 * 4 if "8bit" in name else 0  # the two 256-entry float32 quantization maps
    assert real == sum(state_bytes(name, tuple(p.shape)) for p in params) + shared_maps
    if "8bit" in name:  # the large tensors really hold 8-bit moments
        assert any(v.dtype == torch.uint8 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def test_full_fine_tuning_with_8bit_adamw_lowers_the_loss(tiny_recipe):
    pytest.importorskip("bitsandbytes")
    recipe = tiny_recipe(
        "method.type=full",
        "training.optimizer=adamw_8bit",
        "training.learning_rate=0.001",
        "training.max_steps=8",
        "training.tensorboard=false",
        "training.plots=false",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.5


def test_full_fine_tuning_in_bfloat16_trains_and_saves_bfloat16_weights(tiny_recipe):
    from safetensors.torch import load_file

    from afina.rundir import RunDir

    recipe = tiny_recipe(
        "method.type=full",
        "model.dtype=bfloat16",
        "training.precision=bf16",
        "training.learning_rate=0.001",
        "training.max_steps=8",
        "training.tensorboard=false",
        "training.plots=false",
    )
    prepare(recipe)
    summary = train(recipe, progress=False)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.5
    saved = load_file(str(RunDir(recipe.run_dir).model / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    # Evaluation holds the run's weights in the dtype it trained in (the tuned model and the base beside it).
    from afina.eval.systems import SystemModels

    models = SystemModels.load(recipe, torch.device("cpu"))
    for system in ("tuned", "base"):
        model, _ = models.get(system)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, system
