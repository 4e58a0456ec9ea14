"""Every save path refuses to write, or to report as a success, weights that hold no tensors; the adapter's
file names come from peft's own naming, matched by parameter name (never by object identity)."""

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from afina.config import MethodConfig
from afina.models.saved import EmptyWeightsError, require_saved_weights
from afina.train.checkpoint import save_checkpoint, save_weights
from afina.train.fsdp import adapter_names, save_streamed_result, write_streamed_safetensors
from afina.train.methods import apply_method, load_for_method


def test_a_folder_whose_weights_hold_no_tensors_is_an_error_naming_it(tmp_path):
    with pytest.raises(EmptyWeightsError, match="no .safetensors file was written"):
        require_saved_weights(tmp_path)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))  # a valid file with a header and nothing else
    with pytest.raises(EmptyWeightsError, match=r"adapter_model\.safetensors hold no tensors"):
        require_saved_weights(tmp_path)
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(tmp_path / "adapter_model.safetensors"))
    assert require_saved_weights(tmp_path) == 2


def test_the_streamed_writer_refuses_an_empty_tensor_list(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    with pytest.raises(EmptyWeightsError, match="no tensors to save"):
        write_streamed_safetensors(path, [], write=True)
    assert not path.exists()


def test_a_checkpoint_of_a_model_with_nothing_trainable_is_refused(tmp_path, tiny_model_dir):
    model = load_for_method(str(tiny_model_dir), MethodConfig(type="lora"), torch.device("cpu"))
    model.requires_grad_(False)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(EmptyWeightsError, match="checkpoint"):
        save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler, random.Random(0), {}, keep=2)
    with pytest.raises(EmptyWeightsError, match="checkpoint"):
        save_weights(tmp_path / "best", model, {})
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_file_names_are_peft_s_own_for_every_trainable_parameter(tiny_model_dir, tmp_path, dora):
    """The names the streamed (FSDP) writer gives each trainable parameter are the keys peft's own
    save_pretrained writes; the file it writes has the same tensors, so peft loads it."""
    method = MethodConfig(type="lora", r=4, dora=dora)
    model = apply_method(load_for_method(str(tiny_model_dir), method, torch.device("cpu")), method)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    names = adapter_names(model, trainable)
    assert sorted(names) == sorted(trainable)
    model.save_pretrained(tmp_path / "peft")
    peft_saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(names.values()) == sorted(peft_saved)

    save_streamed_result(model, tmp_path / "streamed", "lora", write=True, dtype=None)
    streamed = load_file(str(tmp_path / "streamed" / "adapter_model.safetensors"))
    assert streamed.keys() == peft_saved.keys()
    for key in peft_saved:
        torch.testing.assert_close(streamed[key], peft_saved[key], rtol=0, atol=0)
