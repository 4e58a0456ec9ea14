"""The fine-tuning methods: which weights train, and how the base model is loaded for them."""

from __future__ import annotations

import gc
import math
import zlib
from typing import Any

import torch

from afina.config import MethodConfig


def load_for_method(spec: str, method: MethodConfig, device, rope: dict | None = None, dtype: str = "float32"):
    """The base model as the method needs it: weights in `dtype` (a torch dtype name, train/precision.py),
    the linear layers in 4-bit NF4 for QLoRA; `rope`: rope scaling."""
    from afina.models import load_model

    if torch.device(device).type == "meta":  # FSDP builds from the config and loads its shards itself
        check_meta_method(method)
        return meta_base_model(spec, dtype, rope)
    if method.type != "qlora":
        return load_model(spec, dtype, rope=rope).to(device)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if dtype != "float16" else torch.float16,
    )
    model = load_model(spec, dtype, rope=rope, quantization_config=quantization, device_map={"": str(device)})
    if dtype == "float32":  # peft's preparation casts every weight that is not 4-bit to float32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)  # the rest of the preparation; the embeddings and norms stay in `dtype`
    if torch.device(device).type == "cpu":
        release_checkpoint_file(model)
        keep_4bit_layout_trainable(model)
    return model


def keep_4bit_layout_trainable(model) -> int:
    """Keep every 4-bit layer in the layout autograd trains through; returns how many layers were checked.

    bitsandbytes 0.49+ on a CPU with AVX512-BF16 repacks a Linear4bit's weight *in place* into an
    inference-only layout the first time the layer runs in eval mode without gradients (afina's validation
    does exactly that), and the layer keeps that layout once it trains again: its gemv_4bit kernel has no
    autograd formula (gradients through the base are silently wrong), adds the bias in place on a leaf that
    requires grad (an error) and needs the output size divisible by 32 (an error on small shapes). The
    layer's own switch for it is turned off, and a weight already repacked is unpacked. An AVX2-only CPU
    never took this path; on a GPU the layers have no such switch and nothing changes."""
    checked = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            checked += 1
        weight: Any = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if weight is not None and state is not None and getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes' own inverse (the layer calls it itself before saving its state dict).
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            checked += 1
    return checked


def release_checkpoint_file(model) -> None:
    """Copy the weights that still point into the memory-mapped checkpoint (QLoRA's embeddings, norms and output
    layer) into memory of their own. While any tensor views the mapping, every page read while quantizing stays
    resident: the whole float32 file, 0.4 GB of the default model's 1 GB QLoRA peak on a CPU."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.uint8:  # the 4-bit weights were quantized into new memory
                tensor.data = tensor.data.clone()
    gc.collect()  # the old views, and with them the mapping


META_METHODS = ("lora", "full")


def check_meta_method(method) -> None:
    """The methods the meta-device FSDP path builds: LoRA (with or without rsLoRA) and full fine-tuning."""
    from afina.config import RecipeError

    if method.type not in META_METHODS or (method.type == "lora" and method.dora):
        what = "method.dora=true" if method.type == "lora" else f"method.type={method.type}"
        raise RecipeError(
            f"training.distributed=fsdp: {what} is not supported (its start values need the whole "
            "weights); use method.type=lora or full, or training.distributed=ddp"
        )


def meta_base_model(spec: str, dtype: str, rope: dict | None = None):
    """The base model on the meta device, from its config alone (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from afina.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(spec))
    if rope:
        from afina.models.rope import apply_rope_settings

        config = apply_rope_settings(config, rope)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.eval()
    return model


def apply_method(model, method: MethodConfig, task_type: str = "CAUSAL_LM"):
    """Wrap the model so that exactly the method's weights train.

    task_type SEQ_CLS / TOKEN_CLS (a model with a new classification head): peft trains the head
    in full beside the adapter (its modules_to_save) and saves it with the adapter.
    """
    if method.type == "full":
        model.requires_grad_(True)  # in the weights' dtype: bfloat16 trains through optim.MasterWeights
        if method.freeze_layers:
            decoder = model.get_decoder()
            for layer in list(decoder.layers)[: method.freeze_layers]:
                layer.requires_grad_(False)
        if method.freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        return model
    import peft

    targets = method.target_modules
    # A new head trains in full (peft's modules_to_save); all-linear must not also put an adapter on it.
    options: dict = {"exclude_modules": ["score", "classifier"]} if task_type != "CAUSAL_LM" else {}
    if method.last_layers:
        n_layers = model.config.num_hidden_layers
        options["layers_to_transform"] = list(range(max(0, n_layers - method.last_layers), n_layers))
        if targets == "all-linear":  # peft needs module names with layers_to_transform: the layers' linear ones
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and ".layers." in name
                }
            )
    alpha: Any = method.alpha  # peft annotates alpha as an int; any float scale works (alpha / r)
    config: peft.PeftConfig
    if method.type in ("lora", "qlora"):
        config = peft.LoraConfig(
            r=method.r,
            lora_alpha=alpha,
            lora_dropout=method.dropout,
            target_modules=targets,
            use_rslora=method.rslora,
            use_dora=method.dora,
            task_type=task_type,
            **options,
        )
    elif method.type == "loha":
        config = peft.LoHaConfig(
            r=method.r,
            alpha=alpha,
            module_dropout=method.dropout,
            target_modules=targets,
            task_type=task_type,
            **options,
        )
    elif method.type == "lokr":
        config = peft.LoKrConfig(
            r=method.r,
            alpha=alpha,
            module_dropout=method.dropout,
            target_modules=targets,
            task_type=task_type,
            **options,
        )
    else:  # ia3: learned rescaling vectors; the feed-forward modules are scaled on their input
        ia3_targets = ["k_proj", "v_proj", "down_proj"] if targets == "all-linear" else targets
        config = peft.IA3Config(
            target_modules=ia3_targets,
            feedforward_modules=[t for t in ia3_targets if t in ("down_proj", "up_proj", "gate_proj")],
            task_type=task_type,
            **options,
        )
    from afina.train.precision import keep_trainable_in_float32

    model = peft.get_peft_model(model, config)
    keep_trainable_in_float32(model)  # the adapter (and a new head) in float32 beside a bfloat16 base
    if method.type in ("lora", "qlora"):
        restart_lora_a(model)
    return model


def lora_a_start(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A LoRA A matrix's starting value, as peft draws it (kaiming-uniform, a=sqrt(5)), from a generator seeded by
    the run's seed and the parameter's name: the same whether the model is built whole or on the meta device and
    sharded (train/fsdp.py), where the order of random draws differs."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    value = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    return value


def restart_lora_a(model) -> None:
    """Set every LoRA A to lora_a_start (B stays zero, so the model's output is unchanged). Meta tensors are left."""
    seed = torch.initial_seed()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name and param.device.type != "meta":
                param.copy_(lora_a_start(name, tuple(param.shape), seed))
