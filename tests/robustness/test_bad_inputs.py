"""`hf2paged convert` on inputs it cannot convert: one clear line on stderr (where, what,
what to do next), exit 2, never a traceback, and generated/ byte-for-byte untouched.

Every case writes to the default output (the project's generated/) on purpose: a failed
conversion must not touch it.
"""

from __future__ import annotations

import os
import re

import pytest
from cli_helpers import (
    GENERATED,
    one_error_line,
    replace_once,
    run_cli,
    snapshot,
    source_of,
)

LLAMA_ATTN_LOOKUP = """attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )"""


def _write(directory, name: str, text: str | bytes):
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _missing(d):
    return str(d / "modeling_missing.py")


def _not_python(d):
    return _write(d, "notes.txt", "these are notes\n")


def _binary(d):
    return _write(d, "modeling_blob.py", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")


def _deep(d):
    # valid grammar, but CPython's parser gives up (RecursionError) on the nesting
    return _write(d, "modeling_deep.py", "x = " + "1 + " * 30000 + "1\n")


def _directory(d):
    (d / "modeling_dir.py").mkdir()
    return str(d / "modeling_dir.py")


def _syntax_error(d):
    return _write(d, "modeling_typo.py", "import torch\n\n\ndef f(x:\n    return x\n")


def _no_causal_lm(d):
    return _write(
        d, "modeling_encoder.py", "import torch\n\n\nclass Encoder(torch.nn.Module):\n    pass\n"
    )


def _hand_written_attention(d):
    # Llama, but its attention calls eager attention directly: no pass recognises it.
    text = replace_once(
        source_of("llama"), LLAMA_ATTN_LOOKUP, "attention_interface = eager_attention_forward"
    )
    return _write(d / "llama", "modeling_llama.py", text)


def _unavailable_import(d):
    # Llama using a rotary kernel from a package that is not installed.
    text = replace_once(
        source_of("llama"),
        "from ...activations import ACT2FN\n",
        "from ...activations import ACT2FN\nfrom hf2paged_missing_kernels import fused_rope\n",
    )
    text = replace_once(
        text,
        "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)",
        "query_states, key_states = fused_rope(query_states, key_states, cos, sin)",
    )
    return _write(d / "llama", "modeling_llama.py", text)


def _sibling_import(d):
    # A modeling file outside transformers whose one-dot import names a module that is
    # not beside it.
    return _write(d, "modeling_mymodel.py", source_of("llama"))


def _generated_output(d):
    return _write(d, "modeling_llama.py", (GENERATED / "llama.py").read_text())


# (input builder, pattern the one line must match: where, what, and the next step)
CASES = {
    "missing path": (_missing, r"modeling_missing\.py: no such file or directory — pass"),
    "non-Python file": (_not_python, r"notes\.txt: not a Python file — pass"),
    "binary .py file": (_binary, r"modeling_blob\.py: not a text file .* — pass"),
    "nested too deeply": (_deep, r"modeling_deep\.py: nested too deeply .* — split"),
    "directory": (_directory, r"modeling_dir\.py: no config\.json: not a model directory — pass"),
    "syntax error": (
        _syntax_error,
        r"modeling_typo\.py:4: not valid Python: .*\[`def f\(x:`\] — fix the syntax",
    ),
    "no *ForCausalLM": (_no_causal_lm, r"modeling_encoder\.py: .*ForCausalLM.* — convert"),
    "unknown model type": (
        lambda d: "lamma",
        r"^error: lamma: unknown model type 'lamma'.* — did you mean llama",
    ),
    "attention not recognised (installed mamba, a state-space model)": (
        lambda d: "mamba",
        r"^error: mamba is out of scope \(state-space / recurrent\): .*; for contributors: "
        r".*modeling_mamba\.py:\d+: no attention class .* — .*extend converter/passes/attention/",
    ),
    "attention not recognised (hand-written)": (
        _hand_written_attention,
        r"modeling_llama\.py:\d+: no attention class .* — ",
    ),
    "unavailable package": (
        _unavailable_import,
        r"modeling_llama\.py:\d+: .*imports 'hf2paged_missing_kernels', which is not available "
        r"here \[`from hf2paged_missing_kernels import fused_rope`\] — install",
    ),
    "unavailable sibling module": (
        _sibling_import,
        r"modeling_mymodel\.py:\d+: .*'transformers\.models\.mymodel\.configuration_llama'.*"
        r"\[`from \.configuration_llama import LlamaConfig`\] — a one-dot import names a "
        r"module beside the modeling file: put configuration_llama\.py there",
    ),
    "hf2paged's own output": (
        _generated_output,
        r"modeling_llama\.py:1: this is hf2paged output .* — convert its source instead: "
        r"`hf2paged convert llama`",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_generated_untouched(case, tmp_path):
    build, pattern = CASES[case]
    target = build(tmp_path)
    before = snapshot(GENERATED)
    line = one_error_line(run_cli("convert", target))
    assert re.search(pattern, line), line
    assert snapshot(GENERATED) == before


def test_output_path_under_a_file(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    line = one_error_line(run_cli("convert", "llama", "--out", blocker / "sub"))
    assert re.search(r"not_a_dir is not a directory — pass --out a directory", line), line
    assert blocker.read_text() == "x"


def test_read_only_output_directory(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "llama.py").write_text("old")
    out.chmod(0o555)
    if os.geteuid() == 0:
        # root writes anyway, so a 0555 directory only fails where permission bits count:
        # let os.access answer as it would for a normal user.
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if os.path.realpath(path) == str(out.resolve()) and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    try:
        line = one_error_line(run_cli("convert", "llama", "--out", out))
        assert re.search(r"ro is not writable — pass --out a writable directory", line), line
        assert (out / "llama.py").read_text() == "old"
        assert sorted(p.name for p in out.iterdir()) == ["llama.py"]
    finally:
        out.chmod(0o755)


def test_broken_rules_file_is_one_line(tmp_path, monkeypatch):
    """A typo in rules/*.toml (project data a developer edits) names the file and line."""
    import shutil

    import converter.convert
    from converter.pipeline import RULES_DIR, load_rules

    for path in RULES_DIR.glob("*.toml"):
        shutil.copy(path, tmp_path)
    rules = tmp_path / "architectures.toml"
    rules.write_text(rules.read_text() + "\n[broken\n")
    monkeypatch.setattr(converter.convert, "load_rules", lambda: load_rules(tmp_path))
    before = snapshot(GENERATED)
    line = one_error_line(run_cli("convert", "--all"))
    assert re.search(
        r"architectures\.toml: invalid TOML: .*\(at line \d+, column \d+\) — fix", line
    )
    assert snapshot(GENERATED) == before


def test_damaged_module_in_output_directory(tmp_path):
    """The registry reads every generated module in --out: a damaged one is named, the
    batch writes nothing, and files that are not ours are left alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "junk.py").write_text("# AUTO-GENERATED by hf2paged 0.1.0 from junk\ndef f(:\n")
    (out / "notes.py").write_bytes(b"\xff\xfe not ours")
    before = snapshot(out)
    result = run_cli("convert", "llama", "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.search(
        r"nothing written: .*junk\.py:2: .*damaged.* — delete it or regenerate", errors[0]
    )
    assert snapshot(out) == before
