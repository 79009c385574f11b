"""`hf2paged coverage`: classification, tiny configs, failure rows, the command end to end."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from converter.errors import ConversionError
from hf2paged.cli import app
from hf2paged.verify.coverage import readme_with_summary, select_types
from hf2paged.verify.coverage_config import tiny_overrides
from hf2paged.verify.coverage_job import Outcome, check, init_worker
from hf2paged.verify.coverage_report import render_markdown, summarize
from hf2paged.verify.coverage_rules import (
    causal_lm_types,
    classify,
    classify_all,
    default_config_dict,
    detect_bucket,
    load_coverage_rules,
)

RULES = load_coverage_rules()


@pytest.mark.parametrize(
    "model_type, arch, bucket, scope",
    [
        ("llama", "LlamaForCausalLM", "dense", "in"),
        ("mixtral", "MixtralForCausalLM", "moe", "in"),
        ("mamba", "MambaForCausalLM", "state_space", "out"),
        ("bert", "BertLMHeadModel", "encoder", "out"),
    ],
)
def test_known_types_are_classified(model_type, arch, bucket, scope):
    c = classify(model_type, arch, RULES)
    assert (c.bucket, c.scope, c.source) == (bucket, scope, "census")
    assert (c.reason == "") == (scope == "in")


@pytest.mark.parametrize(
    "model_type, bucket",
    [("llama", "dense"), ("mixtral", "moe"), ("mamba", "state_space"), ("jamba", "hybrid")],
)
def test_structure_detection_agrees_with_the_census(model_type, bucket):
    # What an unlisted type (a newer transformers) would get from its config alone.
    assert detect_bucket(default_config_dict(model_type), RULES) == bucket


def test_every_causal_lm_type_is_in_exactly_one_bucket_of_the_census():
    classes = classify_all(RULES, causal_lm_types())
    assert {c.source for c in classes} == {"census"}
    counts = {s: sum(c.scope == s for c in classes) for s in ("in", "later", "out")}
    assert counts == {"in": 69 + 48, "later": 0, "out": 79}


def test_tiny_overrides_shrink_only_keys_the_config_has():
    llama = tiny_overrides("llama", default_config_dict("llama"), RULES)
    assert llama["num_hidden_layers"] == 2 and llama["hidden_size"] == 64
    # head_dim differs from hidden / heads, so code confusing the two cannot pass
    assert (llama["num_attention_heads"], llama["num_key_value_heads"], llama["head_dim"]) == (
        4,
        2,
        32,
    )
    assert tiny_overrides("helium", default_config_dict("helium"), RULES)["head_dim"] == 16
    assert llama["vocab_size"] == 128 and llama["initializer_range"] == 0.2
    assert "n_layer" not in llama
    gptj = tiny_overrides("gptj", default_config_dict("gptj"), RULES)
    assert (gptj["n_layer"], gptj["n_embd"], gptj["rotary_dim"]) == (2, 64, 8)
    assert gptj["bos_token_id"] < 128 and gptj["eos_token_id"] < 128  # default 50256
    mistral = tiny_overrides("mistral", default_config_dict("mistral"), RULES)
    assert mistral["sliding_window"] == 4
    # Quirks come from the data: dory's layer split.
    dory = tiny_overrides("dory", default_config_dict("dory"), RULES)
    assert dory["num_hidden_layers"] == 3 and dory["n_recurrent_loops"] == 2


def test_unconvertible_type_yields_a_row_with_the_converters_reason():
    init_worker()
    outcome = Outcome(**check("mamba", "MambaForCausalLM", 120, None))
    assert outcome.converted is False and outcome.parity is None
    assert outcome.stage == "convert"
    assert "models/mamba/modeling_mamba.py" in outcome.reason and "\n" not in outcome.reason
    missing = Outcome(**check("no_such", "NoSuchForCausalLM", 120, None))
    assert missing.stage == "config" and "NoSuchForCausalLM" in missing.reason
    classes = [classify("mamba", "MambaForCausalLM", RULES)]
    # Force it in scope, as if the rules listed it as dense, to render its row.
    classes = [c.__class__(**{**c.__dict__, "scope": "in", "reason": ""}) for c in classes]
    text = render_markdown(classes, {"mamba": outcome}, "5.24.0", "test", 1.0, 1)
    row = next(line for line in text.splitlines() if line.startswith("| mamba |"))
    assert "**no**" in row and "modeling_mamba.py" in row
    assert summarize(classes, {"mamba": outcome}).parity == 0


def test_a_type_over_its_timeout_is_a_timeout_row(monkeypatch):
    import time

    import hf2paged.verify.coverage_job as job

    def slow_check(*args):
        # Like the converter's last line of defence: every Exception becomes a one-line
        # error. The timeout must pass through it, not be relabelled a conversion failure.
        try:
            time.sleep(5)
        except Exception as exc:
            raise ConversionError(f"internal error: {exc}") from None

    init_worker()
    monkeypatch.setattr(job, "_check", slow_check)
    outcome = Outcome(**check("llama", "LlamaForCausalLM", 0.2, None))
    assert outcome.stage == "timeout" and outcome.parity is None


def test_only_rejects_unknown_types_with_a_hint():
    with pytest.raises(ValueError, match="llamma.*did you mean llama"):
        select_types(["llamma"], causal_lm_types())


def test_readme_block_is_replaced_between_markers_only():
    classes = classify_all(RULES, {"llama": "LlamaForCausalLM", "mamba": "MambaForCausalLM"})
    summary = summarize(classes, {"llama": Outcome("llama", converted=True, parity=True)})
    readme = "# x\n<!-- coverage:begin -->\nold\n<!-- coverage:end -->\ntail\n"
    new = readme_with_summary(readme, summary, "docs/coverage.md")
    assert "old" not in new and new.endswith("<!-- coverage:end -->\ntail\n")
    assert "**1 of 1 dense decoder-only attention**" in new
    assert readme_with_summary("no markers\n", summary, "docs/coverage.md") is None


def test_command_only_llama_opt_reports_both_at_parity(tmp_path):
    out = tmp_path / "coverage.md"
    result = CliRunner().invoke(
        app,
        ["coverage", "--only", "llama", "opt", "--out", str(out), "--jobs", "2", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for arch in ("llama", "opt"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {arch} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:4] == ["yes", "yes"], row
        diff, tol = map(float, re.match(r"(\S+) \(tol (\S+)\)", cells[4]).groups())
        assert diff <= tol
    assert "**2 / 2**" in text


def test_a_crash_or_a_hang_in_one_job_never_stops_the_others():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from coverage_fake_jobs import fake_check

    from hf2paged.verify.coverage_runner import run_jobs

    jobs = [("ok_a", "A"), ("crash_b", "B"), ("ok_c", "C"), ("hang_d", "D"), ("ok_e", "E")]
    done = []
    results = run_jobs(
        jobs, 2, timeout=1.0, on_done=done.append, fn=fake_check, initializer=None, grace=2.0
    )
    assert sorted(results) == sorted(t for t, _ in jobs) and len(done) == len(jobs)
    for ok in ("ok_a", "ok_c", "ok_e"):
        assert results[ok].parity is True
    assert (
        results["crash_b"].stage == "crash" and "worker process died" in results["crash_b"].reason
    )
    assert results["hang_d"].stage == "timeout" and "killed" in results["hang_d"].reason


def test_failures_group_by_cause_without_file_line_or_construct():
    from hf2paged.verify.coverage_report import failure_groups

    classes = classify_all(
        RULES, {"bloom": "BloomForCausalLM", "mpt": "MptForCausalLM", "llama": "LlamaForCausalLM"}
    )
    no_aaf = "no attention class calls the attention interface — extend converter/passes/attention/"
    outcomes = {
        "bloom": Outcome(
            "bloom",
            converted=False,
            stage="convert",
            reason=f"models/bloom/modeling_bloom.py:564: {no_aaf}",
        ),
        "mpt": Outcome(
            "mpt",
            converted=False,
            stage="convert",
            reason=f"models/mpt/modeling_mpt.py:369: {no_aaf}",
        ),
        "llama": Outcome("llama", converted=True, parity=True),
    }
    assert failure_groups(classes, outcomes) == [
        ("convert: no attention class calls the attention interface", ["bloom", "mpt"])
    ]
