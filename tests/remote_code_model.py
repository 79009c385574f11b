"""A model directory that carries its own code, as issue 14 reproduces it: transformers'
Qwen2 modeling and configuration files copied into a folder, the classes renamed
`Qwen2` -> `MyLM`, the transformers imports absolute and the config import relative
(`from .configuration_mylm import MyLMConfig`), as a Hub repository with `auto_map` has
them; a tiny random model saved there, config.json naming the `auto_map`.

`copied_style=True` keeps the copy's climbing relative imports (`from ...activations`)
instead: a modeling file with its siblings, as copied out of a transformers tree.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import transformers

AUTO_MAP = {
    "AutoConfig": "configuration_mylm.MyLMConfig",
    "AutoModelForCausalLM": "modeling_mylm.MyLMForCausalLM",
}
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    # layer 0 full attention, layer 1 sliding (window 4, shorter than the prompts)
    use_sliding_window=True,
    sliding_window=4,
    max_window_layers=1,
)


def write_code(directory: Path, copied_style: bool = False) -> None:
    """modeling_mylm.py and configuration_mylm.py from the installed Qwen2 files."""
    directory.mkdir(parents=True, exist_ok=True)
    qwen2 = Path(transformers.__file__).parent / "models" / "qwen2"
    for kind in ("modeling", "configuration"):
        text = (qwen2 / f"{kind}_qwen2.py").read_text()
        if not copied_style:
            text = text.replace("from ...", "from transformers.")
        text = text.replace("Qwen2", "MyLM").replace("qwen2", "mylm")
        (directory / f"{kind}_mylm.py").write_text(text)


def _config_class(directory: Path):
    """MyLMConfig, imported from the directory's file (its imports are absolute)."""
    name = f"_mylm_config_{abs(hash(str(directory)))}"
    spec = importlib.util.spec_from_file_location(name, directory / "configuration_mylm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # transformers' docstring helpers look the class up
    spec.loader.exec_module(module)
    return module.MyLMConfig


def make_mylm_dir(directory: Path, seed: int = 0) -> Path:
    """The reproduction: code, config.json with auto_map, random weights (every
    parameter perturbed, so norms and biases are not 1 / 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_code(directory)
    config = _config_class(directory)(**TINY)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MyLMForCausalLM"]
    config.save_pretrained(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    model.save_pretrained(directory)
    return directory


def hf_model(directory: Path):
    """transformers' model of the directory (its own code), eager attention, fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, attn_implementation="eager", dtype=torch.float32
    ).eval()
