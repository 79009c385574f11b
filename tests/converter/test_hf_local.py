"""converter/hf/local.py: a model directory's own code found from config.json's auto_map,
the modules beside it it imports (transitively), and one key for all of them."""

from __future__ import annotations

import json

import pytest

from converter.errors import ConversionError
from converter.hf.local import identifier, local_modules, sources_sha256
from converter.hf.resolve import resolve


def _dir(tmp_path, auto_map=None, model_type="mylm"):
    d = tmp_path / "model"
    d.mkdir()
    config = {"model_type": model_type, "architectures": ["MyLMForCausalLM"]}
    if auto_map is not None:
        config["auto_map"] = auto_map
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_mylm.py").write_text(
        "from .configuration_mylm import MyLMConfig\nfrom ...utils import logging\n"
    )
    (d / "configuration_mylm.py").write_text("from .rope_mylm import rope\n")
    (d / "rope_mylm.py").write_text("rope = 1\n")
    (d / "unrelated.py").write_text("x = 1\n")
    return d


def test_a_directory_resolves_through_auto_map(tmp_path):
    d = _dir(tmp_path, {"AutoModelForCausalLM": "modeling_mylm.MyLMForCausalLM"})
    source = resolve(str(d))
    assert source.path == (d / "modeling_mylm.py").resolve() and source.local
    assert source.model_type == "mylm"
    assert list(source.siblings) == ["configuration_mylm", "rope_mylm"]  # not unrelated.py


def test_a_directory_of_a_transformers_type_resolves_to_transformers(tmp_path):
    d = tmp_path / "llama_dir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    source = resolve(str(d))
    assert source.path.parts[-3:] == ("models", "llama", "modeling_llama.py")
    assert not source.local and source.siblings == {}


def test_a_directory_without_auto_map_uses_its_one_modeling_file(tmp_path):
    source = resolve(str(_dir(tmp_path)))
    assert source.path.name == "modeling_mylm.py" and source.local


@pytest.mark.parametrize(
    ("auto_map", "message"),
    [
        ({"AutoModelForCausalLM": "other/repo--modeling_x.X"}, "another repository"),
        ({"AutoModelForCausalLM": "modeling_absent.X"}, "modeling_absent.py, which is not"),
    ],
)
def test_bad_auto_map_is_one_line(tmp_path, auto_map, message):
    with pytest.raises(ConversionError, match=message):
        resolve(str(_dir(tmp_path, auto_map)))


def test_the_key_changes_with_any_file_of_the_code(tmp_path):
    d = _dir(tmp_path)
    modeling = d / "modeling_mylm.py"
    key = sources_sha256(modeling, local_modules(modeling), "v1")
    assert key == sources_sha256(modeling, local_modules(modeling), "v1")
    assert key != sources_sha256(modeling, local_modules(modeling), "v2")
    (d / "unrelated.py").write_text("x = 2\n")
    assert key == sources_sha256(modeling, local_modules(modeling), "v1")
    (d / "rope_mylm.py").write_text("rope = 2\n")
    assert key != sources_sha256(modeling, local_modules(modeling), "v1")


def test_identifier():
    assert identifier("my-lm") == "my_lm" and identifier("9b") == "m_9b"
