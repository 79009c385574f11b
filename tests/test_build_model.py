"""`build_model`: the one way from a checkpoint to a loaded generated model."""

from __future__ import annotations

import pytest
import torch
from engine_models import build_model_dir

from runtime.engine.build_model import build_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model_dir("llama", tmp_path_factory.mktemp("build"), with_tokenizer=False)


def test_builds_in_dtype_on_device_loaded_and_in_eval_mode(llama) -> None:
    model_dir, hf = llama
    model = build_model(model_dir, torch.bfloat16, "cpu")
    assert not model.training
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    name = "model.embed_tokens.weight"
    assert torch.equal(params[name], hf.state_dict()[name].to(torch.bfloat16))
    assert torch.get_default_dtype() == torch.float32  # restored


def test_a_given_class_and_config_are_used(llama) -> None:
    from transformers import AutoConfig

    from generated.llama import LlamaForCausalLM

    model_dir, _ = llama
    config = AutoConfig.from_pretrained(model_dir)
    built = []

    class Recorded(LlamaForCausalLM):
        def __init__(self, cfg):
            built.append(cfg)
            super().__init__(cfg)

    model = build_model(model_dir, config=config, model_class=Recorded)
    assert isinstance(model, Recorded) and built == [config]


def test_a_tp_size_the_process_does_not_have_is_refused(llama) -> None:
    model_dir, _ = llama
    with pytest.raises(ValueError, match=r"build_model\(tp=2\).*group has size 1.*init_parallel"):
        build_model(model_dir, tp=2)
    build_model(model_dir, tp=1)  # the size this process has


def test_an_unloadable_checkpoint_names_the_keys(llama, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir, _ = llama
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.final_norm.weight"] = weights.pop("model.norm.weight")
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.final_norm.weight"):
        build_model(broken)
