"""A tiny random config for one model type: its config class defaults, shrunk.

Every size key the default config has (the key lists are in rules/coverage.toml
[tiny]) is set small: 2 layers, hidden 64, 4 heads / 2 KV heads where the family has
KV heads, head_dim 32 where the config has the key (not hidden / heads, so code that
confuses the two cannot pass), vocab 128, initializer_range 0.2 (logits O(1-10), so a
wrong computation cannot hide below the tolerance), sliding windows smaller than the
prompts; mixture-of-experts configs get 8 experts, top-2, expert intermediate 32 and
one dense layer first where they have a dense prefix ([tiny.moe]). Per-type quirks come
only from [tiny.types.<type>].
"""

from __future__ import annotations

from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tiny_overrides(model_type: str, defaults: dict, rules: dict) -> dict:
    """The keyword overrides that shrink `defaults` (a default config's `to_dict()`)."""
    tiny = rules["tiny"]
    out: dict[str, Any] = {}

    def put(keys: list[str], value: Any, only_int: bool = True) -> None:
        for k in keys:
            if k in defaults and (not only_int or _is_int(defaults[k])):
                out[k] = value

    put(tiny["layer_keys"], tiny["layers"])
    put(tiny["hidden_keys"], tiny["hidden"])
    put(tiny["head_keys"], tiny["heads"])
    put(tiny["intermediate_keys"], tiny["intermediate"])
    put(tiny["position_keys"], tiny["positions"])
    put(tiny["init_keys"], tiny["initializer_range"], only_int=False)
    if _is_int(defaults.get("vocab_size")):
        out["vocab_size"] = tiny["vocab"]
    # KV heads and head_dim only where the family has the key, even when None
    # (a None default usually means "as many as the query heads": grouped-query
    # attention is what serving cares about, so test it).
    for k in tiny["kv_head_keys"]:
        if k in defaults and (defaults[k] is None or _is_int(defaults[k])):
            out[k] = tiny["kv_heads"]
    if "head_dim" in defaults and (defaults["head_dim"] is None or _is_int(defaults["head_dim"])):
        out["head_dim"] = tiny["head_dim"]
    for k, value in tiny.get("fixed", {}).items():
        if _is_int(defaults.get(k)):
            out[k] = value
    for k in tiny["window_keys"]:
        if _is_int(defaults.get(k)) and defaults[k] > 0:
            out[k] = tiny["sliding_window"]
    mla = tiny.get("mla", {})
    if mla.get("key") in defaults:
        if "head_dim" in defaults:
            out["head_dim"] = tiny["fixed"]["qk_rope_head_dim"]
        for k in tiny["kv_head_keys"]:
            if k in out:
                out[k] = tiny["heads"]
    moe = tiny.get("moe", {})
    for k in moe.get("experts_keys", []) + moe.get("top_k_keys", []):
        if k in defaults and (defaults[k] is None or _is_int(defaults[k])):
            out[k] = moe["experts"] if k in moe["experts_keys"] else moe["top_k"]
    for k in moe.get("intermediate_keys", []):
        if _is_int(defaults.get(k)) and defaults[k] > 0:  # 0: the block is off
            out[k] = moe["intermediate"]
    for keys, value in (("group_keys", "groups"), ("topk_group_keys", "topk_groups")):
        for k in moe.get(keys, []):
            if _is_int(defaults.get(k)) and defaults[k] > 1:  # 1 / None: no grouping
                out[k] = moe[value]
    for k in moe.get("dense_prefix_keys", []):
        if _is_int(defaults.get(k)) and defaults[k] > 0:
            out[k] = moe["dense_prefix"]
    for k in moe.get("dense_layer_list_keys", []):
        if isinstance(defaults.get(k), list):
            out[k] = list(range(moe["dense_prefix"]))
    # Special token ids must fall inside the shrunk vocabulary.
    for i, k in enumerate(tiny["token_keys"]):
        value = defaults.get(k)
        if _is_int(value) and value >= tiny["vocab"]:
            out[k] = min(i, 2)
        elif isinstance(value, list) and any(_is_int(v) and v >= tiny["vocab"] for v in value):
            out[k] = [min(i, 2)]
    out.update(tiny.get("types", {}).get(model_type, {}))
    return out


def tiny_config(model_type: str, config_class: type, rules: dict):
    """A `config_class` instance (the causal-LM class's own config class, e.g. the text
    config of a composite model) with the tiny overrides applied."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = config_class().to_dict()
        overrides = tiny_overrides(model_type, defaults, rules)
        # Derived layouts (layer_types, windows per layer) are recomputed from the new
        # layer count: never carry the default's.
        for k in ("layer_types", "mlp_layer_types"):
            if k in defaults and k not in overrides:
                overrides[k] = None
        return config_class(**overrides)
