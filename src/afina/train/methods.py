"""The fine-tuning methods: which weights train, and how the base model is loaded for them."""

from __future__ import annotations

from afina.config import MethodConfig


def load_for_method(spec: str, method: MethodConfig, device, rope: dict | None = None):
    """The base model as the method needs it: fp32 weights, or 4-bit NF4 for QLoRA; `rope`: rope scaling."""
    from afina.models import load_model

    if method.type != "qlora":
        return load_model(spec, "float32", rope=rope).to(device)
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = load_model(spec, "float32", rope=rope, quantization_config=quantization, device_map={"": str(device)})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def apply_method(model, method: MethodConfig, task_type: str = "CAUSAL_LM"):
    """Wrap the model so that exactly the method's weights train.

    task_type SEQ_CLS / TOKEN_CLS (a model with a new classification head): peft trains the head
    in full beside the adapter (its modules_to_save) and saves it with the adapter.
    """
    if method.type == "full":
        model.requires_grad_(True)
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
            import torch

            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    if method.type in ("lora", "qlora"):
        config = peft.LoraConfig(
            r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=targets,
            use_rslora=method.rslora, use_dora=method.dora, task_type=task_type, **options,
        )
    elif method.type == "loha":
        config = peft.LoHaConfig(r=method.r, alpha=method.alpha, module_dropout=method.dropout, target_modules=targets, task_type=task_type, **options)
    elif method.type == "lokr":
        config = peft.LoKrConfig(r=method.r, alpha=method.alpha, module_dropout=method.dropout, target_modules=targets, task_type=task_type, **options)
    else:  # ia3: learned rescaling vectors; the feed-forward modules are scaled on their input
        ia3_targets = ["k_proj", "v_proj", "down_proj"] if targets == "all-linear" else targets
        config = peft.IA3Config(
            target_modules=ia3_targets,
            feedforward_modules=[t for t in ia3_targets if t in ("down_proj", "up_proj", "gate_proj")],
            task_type=task_type, **options,
        )
    return peft.get_peft_model(model, config)
