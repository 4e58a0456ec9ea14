"""The estimate's arithmetic (train/memory.py, on the meta device) against the bytes of real tensors."""

import pytest
import torch
from transformers import AutoConfig

from afina.config import MethodConfig
from afina.train.memory import MemoryPlan, memory_estimate, meta_model, model_config, parameter_memory, parse_bytes
from afina.train.methods import apply_method, load_for_method
from afina.train.optim import build_optimizer


class Settings:
    def __init__(self, optimizer):
        self.optimizer, self.learning_rate, self.weight_decay = optimizer, 1e-3, 0.0


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.dim() > 0 and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def real_weight_bytes(model) -> int:
    """Every parameter once (a tied output layer is the embedding), with QLoRA's quantization constants."""
    tensors = list({id(p): p for p in model.parameters()}.values())
    for p in tensors[:]:
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
    return tensor_bytes(tensors)


@pytest.mark.parametrize(
    "method, dtype, optimizer",
    [
        ("lora", "float32", "adamw"),
        ("lora", "bfloat16", "adamw"),
        ("full", "float32", "adamw"),
        ("full", "bfloat16", "adamw"),
        ("full", "float32", "adamw_8bit"),
        ("full", "bfloat16", "adafactor"),
    ],
)
def test_estimate_counts_the_bytes_of_weights_gradients_and_optimizer_state(tiny_model_dir, method, dtype, optimizer):
    if "8bit" in optimizer:
        pytest.importorskip("bitsandbytes")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    spec = MethodConfig(type=method, r=8)
    plan = MemoryPlan(method=spec, weight_dtype=dtype, optimizer=optimizer)
    estimated = parameter_memory(meta_model(config, spec), plan)

    model = apply_method(load_for_method(str(tiny_model_dir), spec, torch.device("cpu"), dtype=dtype), spec)
    assert estimated["weights"] == real_weight_bytes(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optim = build_optimizer([{"params": trained}], Settings(optimizer))
    ids = torch.randint(0, 500, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert estimated["gradients"] == tensor_bytes(p.grad for p in trained)
    optim.step()
    state = [v for s in optim.state.values() for v in s.values()] + list(getattr(optim, "master", []))
    shared_maps = 2 * 256 * 4 if "8bit" in optimizer else 0  # bitsandbytes' two quantization maps, once
    assert estimated["optimizer"] + shared_maps == tensor_bytes(state)


def test_qlora_weights_match_the_4bit_tensors(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    spec = MethodConfig(type="qlora", r=8)
    plan = MemoryPlan(method=spec, weight_dtype="float32")
    estimated = parameter_memory(meta_model(config, spec), plan)["weights"]
    model = apply_method(load_for_method(str(tiny_model_dir), spec, torch.device("cpu")), spec)
    assert estimated == pytest.approx(real_weight_bytes(model), rel=0.01)
    full_precision = parameter_memory(
        meta_model(config, MethodConfig(type="lora", r=8)), plan.replace(method=MethodConfig(type="lora", r=8))
    )["weights"]
    assert estimated < full_precision


def test_fsdp_divides_and_activations_follow_the_batch(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    spec = MethodConfig(type="full")
    model = meta_model(config, spec)
    one = memory_estimate(config, MemoryPlan(method=spec, rows=2, tokens=256), model=model)
    four = memory_estimate(
        config, MemoryPlan(method=spec, rows=2, tokens=256, processes=4, strategy="fsdp"), model=model
    )
    ddp = memory_estimate(config, MemoryPlan(method=spec, rows=2, tokens=256, processes=4, strategy="ddp"), model=model)
    for part in ("gradients", "optimizer"):
        assert four[part] == pytest.approx(one[part] / 4, abs=4) and ddp[part] == one[part]
    # Weights: a quarter, plus what FSDP gathers while running (two layers and the embedding group, float32 here).
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    embedding_group = model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()  # output layer tied
    gathered = (2 * layer + embedding_group) * 4
    assert four["weights"] == pytest.approx(one["weights"] / 4 + gathered, abs=4) and ddp["weights"] == one["weights"]
    assert four["activations"] == one["activations"]  # each process's own micro-batch
    longer = memory_estimate(config, MemoryPlan(method=spec, rows=2, tokens=1024), model=model)
    checkpointed = memory_estimate(
        config, MemoryPlan(method=spec, rows=2, tokens=1024, gradient_checkpointing=True), model=model
    )
    assert longer["activations"] > one["activations"] > 0 and checkpointed["activations"] < longer["activations"]


def test_the_config_alone_is_read_from_a_folder_and_sizes_parse(tiny_model_dir):
    assert model_config(str(tiny_model_dir)).hidden_size == 64
    assert parse_bytes("24GB") == 24 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="--device-memory"):
        parse_bytes("lots")
