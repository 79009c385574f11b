"""What a new user meets in the first hour (issue 14): one clean line and the same exit
code from `verify` and `generate` for a checkpoint that does not fit, file modes that
follow the umask, where an unsupported model type stands, GGUF files converted once,
`--version`, the LICENSE, conflicting options, a missing path, unwrapped help."""

from __future__ import annotations

import importlib.metadata
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from converter.render import REPO_ROOT
from converter.render.writer import write_files
from hf2paged.cli import app, help_text
from hf2paged.verify.coverage_rules import load_coverage_rules, standing

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def run(*args: str, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output, result.output
    return [line for line in result.stderr.splitlines() if line.strip()]


def _tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


KEY = "model.layers.0.mlp.up_proj.weight"
BREAKS = {
    "wrong shape": lambda w: w.__setitem__(KEY, torch.randn(100, 64)),
    "missing weight": lambda w: w.pop(KEY),
}


@pytest.mark.parametrize("case", BREAKS)
def test_verify_and_generate_give_the_same_line_for_a_checkpoint_that_does_not_fit(
    tiny_llama, tmp_path, case
):
    broken = _broken_copy(tiny_llama, tmp_path / "broken", BREAKS[case])
    generated = run("generate", broken, "-p", "hi", "--device", "cpu")
    verified = run("verify", broken)
    assert generated.exit_code == verified.exit_code == 1, (generated.output, verified.output)
    (gen_line,), (ver_line,) = error_lines(generated), error_lines(verified)
    assert gen_line == ver_line and gen_line.startswith("error: ")
    assert "gate_up_proj" in gen_line  # our strict loader's line, not transformers' report
    assert "MISSING" not in verified.stdout and "ignore_mismatched_sizes" not in ver_line


def test_verify_a_missing_path_says_it_does_not_exist(tmp_path):
    for command in ("verify", "generate"):
        args = [command, tmp_path / "nonexistent"] + (["-p", "x"] if command == "generate" else [])
        result = run(*args)
        assert result.exit_code == 2
        (line,) = error_lines(result)
        assert line == f"error: MODEL_DIR {tmp_path / 'nonexistent'} does not exist"


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        result = run("convert", "opt", "--out", tmp_path / "out")
        write_files({tmp_path / "plain.py": "x = 1\n"})
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    expected = 0o666 & ~umask
    assert _modes(tmp_path / "out") == {"opt.py": expected, "__init__.py": expected}
    assert _modes(tmp_path)["plain.py"] == expected


def test_rewritten_files_keep_their_mode(tmp_path):
    path = tmp_path / "kept.py"
    path.write_text("old\n")
    path.chmod(0o640)
    write_files({path: "new\n"})
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_standing_reads_the_coverage_rules():
    rules = {
        "buckets": {
            "dense": {"scope": "in", "label": "dense", "types": ["llama"]},
            "moe": {"scope": "later", "label": "mixture-of-experts", "reason": "needs X", "types": ["mixtral"]},
            "ssm": {"scope": "out", "label": "state-space", "reason": "no KV", "types": ["mamba", "rwkv"]},
        },
        "reasons": {"rwkv": "its own words"},
    }  # fmt: skip
    assert standing("llama", rules) is None and standing("unlisted", rules) is None
    assert standing("mixtral", rules) == (
        "mixtral is not supported yet (mixture-of-experts): needs X (docs/coverage.md)"
    )
    assert (
        standing("mamba", rules) == "mamba is out of scope (state-space): no KV (docs/coverage.md)"
    )
    assert standing("rwkv", rules).endswith("(state-space): its own words (docs/coverage.md)")


@pytest.mark.parametrize("model_type", ["mamba", "jamba", "bert", "mixtral"])
def test_convert_says_where_an_unsupported_type_stands(tmp_path, model_type):
    status = standing(model_type, load_coverage_rules())
    result = run("convert", model_type, "--out", tmp_path)
    if status is None:  # supported by now (mixture-of-experts is being added)
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert line.startswith(f"error: {status}; for contributors: ") and "modeling_" in line
    assert list(tmp_path.iterdir()) == []


def test_state_space_models_are_out_of_scope_with_the_reason():
    # The classification table says why (docs/coverage.md is rendered from it).
    text = standing("mamba", load_coverage_rules())
    assert "out of scope (state-space / recurrent)" in text and "KV cache" in text


def test_stdout_with_out_is_an_error(tmp_path):
    result = run("convert", "llama", "--stdout", "--out", tmp_path / "out")
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "--stdout" in line and "--out" in line
    assert not (tmp_path / "out").exists() and result.stdout == ""


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == (
        f"hf2paged {importlib.metadata.version('hf2paged')} "
        f"(transformers {importlib.metadata.version('transformers')}, "
        f"torch {importlib.metadata.version('torch')})"
    )


def test_license_is_the_apache_2_text_pyproject_names():
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["license"] == {"text": "Apache-2.0"}
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000


def test_help_text_unwraps_paragraphs_and_keeps_lists():
    doc = """First line
    goes on.

    A second paragraph that
    wraps in the source.
    - an item
      continued
    - another
    """
    assert help_text(doc) == (
        "First line goes on.\n\nA second paragraph that wraps in the source.\n"
        "- an item\n  continued\n- another"
    )


def test_help_never_breaks_a_sentence_where_the_source_wrapped():
    """At a wide terminal, each paragraph of each command's docstring is one line."""
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        result = run(name, "--help", env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        shown = {" ".join(line.strip(" │").split()) for line in result.stdout.splitlines()}
        for paragraph in help_text(info.callback.__doc__).split("\n\n"):
            if not paragraph.startswith("-"):
                assert " ".join(paragraph.split()) in shown, (name, paragraph)


def test_a_gguf_file_is_converted_once_into_the_cache(tiny_llama, tmp_path, monkeypatch):
    """`generate x.gguf` converts the file to a cached model directory, with progress
    lines, on the first run only (the conversion itself is transformers'; faked here)."""
    import shutil

    import hf2paged.gguf_cache as gguf_cache

    calls = []

    def fake_convert(gguf, out_dir, log):
        log(f"converting {gguf.name} (fake)")
        calls.append(gguf)
        for f in tiny_llama.iterdir():
            shutil.copy(f, out_dir / f.name)

    monkeypatch.setattr(gguf_cache, "convert_gguf_to_hf", fake_convert)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    prompt = ["-p", "1", "--max-tokens", "2", "--device", "cpu"]
    first = run("generate", gguf, *prompt)
    # A tiny checkpoint without a tokenizer cannot take text: the run gets past the
    # conversion and the build, to the prompt.
    assert "converting tiny.gguf (fake)" in first.stderr
    assert "no tokenizer" in first.stderr and first.exit_code == 1
    second = run("verify", gguf, "--decode-steps", "1")
    assert second.exit_code == 0, second.output
    assert "converting" not in second.stderr and len(calls) == 1
    (cached,) = (tmp_path / "cache" / "hf2paged").iterdir()
    assert cached.name.startswith("tiny-") and (cached / "config.json").is_file()
