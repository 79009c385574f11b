"""Which causal-LM model types `hf2paged coverage` tries, and why the others are skipped.

The data is rules/coverage.toml: buckets of model types seeded from the corpus census,
each with a scope ("in" converted and checked, "later" for mixture-of-experts, "out"
with a reason). A type in no bucket (a newer transformers) is classified by structure,
from the keys of its default config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.pipeline import RULES_DIR

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

COVERAGE_RULES = RULES_DIR / "coverage.toml"
DENSE = "dense"


@dataclass(frozen=True)
class Classification:
    model_type: str
    architecture: str  # the class MODEL_FOR_CAUSAL_LM_MAPPING_NAMES names
    bucket: str  # a key of [buckets]
    label: str
    scope: str  # "in" | "later" | "out"
    reason: str  # why it is not converted ("" when in scope)
    source: str  # "census" (listed in the rules) | "structure" (detected)


def load_coverage_rules(path: Path = COVERAGE_RULES) -> dict:
    with path.open("rb") as f:
        rules = tomllib.load(f)
    seen: dict[str, str] = {}
    for bucket, spec in rules["buckets"].items():
        if spec.get("scope") not in ("in", "later", "out"):
            raise ValueError(f"{path}: bucket {bucket!r} needs scope = in | later | out")
        for t in spec.get("types", []):
            if t in seen:
                raise ValueError(f"{path}: {t!r} is in both {seen[t]!r} and {bucket!r}")
            seen[t] = bucket
    return rules


def causal_lm_types() -> dict[str, str]:
    """{model type: architecture class name} of the installed transformers, in its order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def detect_bucket(config_dict: dict, rules: dict) -> str:
    """A bucket from the structure of a default config (its `to_dict()`)."""
    detect = rules["detect"]
    if any(config_dict.get(k) for k in detect["multimodal_keys"]):
        return "multimodal"
    if config_dict.get("is_encoder_decoder") or any(
        k in config_dict for k in detect["encoder_keys"]
    ):
        return "encoder"
    layer_types = config_dict.get("layer_types") or []
    recurrent = any(
        k.startswith(tuple(detect["recurrent_key_prefixes"])) for k in config_dict
    ) or any(m in str(lt) for lt in layer_types for m in detect["recurrent_layer_markers"])
    if recurrent:
        attention = any(k in config_dict for k in detect["attention_keys"])
        return "hybrid" if attention else "state_space"
    nested = [v for v in config_dict.values() if isinstance(v, dict)]
    if config_dict.get("enable_moe_block") or any(
        _positive(d.get(k)) for d in (config_dict, *nested) for k in detect["moe_keys"]
    ):
        return "moe"
    return DENSE


def default_config_dict(model_type: str) -> dict:
    """The default config of `model_type` as a dict ({} when it cannot be built)."""
    import warnings

    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoConfig.for_model(model_type).to_dict()
        except Exception:  # noqa: BLE001 — a config that needs arguments: no structure to read
            return {}


def classify(
    model_type: str, architecture: str, rules: dict, config_dict: dict | None = None
) -> Classification:
    """The rules' bucket for `model_type`, else the one its config's structure implies."""
    buckets = rules["buckets"]
    bucket = next((b for b, spec in buckets.items() if model_type in spec.get("types", [])), None)
    source = "census"
    if bucket is None:
        source = "structure"
        cfg = config_dict if config_dict is not None else default_config_dict(model_type)
        bucket = detect_bucket(cfg, rules)
    spec = buckets[bucket]
    reason = (
        "" if spec["scope"] == "in" else rules.get("reasons", {}).get(model_type, spec["reason"])
    )
    return Classification(
        model_type, architecture, bucket, spec["label"], spec["scope"], reason, source
    )


def classify_all(rules: dict, types: dict[str, str] | None = None) -> list[Classification]:
    types = types if types is not None else causal_lm_types()
    return [classify(t, arch, rules) for t, arch in types.items()]


def standing(model_type: str, rules: dict | None = None) -> str | None:
    """Where a model type the rules list outside the converted scope stands, in the
    words of docs/coverage.md ("mamba is out of scope (state-space / recurrent): no
    attention: ..."); None for in-scope types and types the rules do not list."""
    rules = rules if rules is not None else load_coverage_rules()
    for spec in rules["buckets"].values():
        if model_type not in spec.get("types", []) or spec["scope"] == "in":
            continue
        reason = rules.get("reasons", {}).get(model_type, spec["reason"])
        where = "out of scope" if spec["scope"] == "out" else "not supported yet"
        return f"{model_type} is {where} ({spec['label']}): {reason} (docs/coverage.md)"
    return None
