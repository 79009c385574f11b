"""Model directories that carry their own code (issue 14): converted once per version of
the code into the per-user cache, found by the registry, run by `hf2paged.LLM` and
`--trust-remote-code` without a prompt, refused in one line without it; parity with
transformers running the same code (fp32, CPU), at TP=1 and TP=2 over gloo."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hf2paged.cli import app
from hf2paged.verify.parity import Scenario, compare, hf_reference, run_generated
from runtime.engine.build_model import build_model
from tests.distributed import run_distributed
from tests.remote_code_model import hf_model, make_mylm_dir, write_code

ATOL = 1e-4
SCENARIO = Scenario()


def run(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh per-user cache for the module (XDG_CACHE_HOME; TP ranks inherit it)."""
    root = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        yield root / "hf2paged" / "modules" / "hf2paged_modules"


@pytest.fixture(scope="module")
def mylm(tmp_path_factory, cache) -> Path:
    return make_mylm_dir(tmp_path_factory.mktemp("mylm"))


@pytest.fixture(scope="module")
def reference(mylm):
    """HF's logits of the scenario's sequences, on the directory's own code."""
    tokens = SCENARIO.tokens(128)
    return tokens, hf_reference(hf_model(mylm), tokens)


@pytest.fixture(autouse=True)
def never_prompt(monkeypatch):
    """transformers asks "run the custom code? [y/N]" through input(): never here."""

    def prompt(*args, **kwargs):
        raise AssertionError(f"prompted: {args}")

    monkeypatch.setattr(builtins, "input", prompt)


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=True)


def test_convert_a_model_directory_into_the_cache(mylm, cache):
    first = run("convert", mylm)
    assert first.exit_code == 0, first.output
    (package,) = cache.iterdir()
    assert package.name.startswith("mylm_") and str(package) in first.stdout
    assert sorted(p.name for p in package.iterdir()) == [
        "__init__.py", "configuration_mylm.py", "mylm.py",
    ]  # fmt: skip
    generated = (package / "mylm.py").read_text()
    assert "from .configuration_mylm import MyLMConfig" in generated
    assert "PagedAttention" in generated and "def load_weights" in generated
    again = run("convert", mylm)
    assert again.exit_code == 0 and "unchanged" in again.stdout
    assert list(cache.iterdir()) == [package]


def test_the_registry_finds_cached_code_in_a_fresh_process(mylm, cache):
    """No PYTHONPATH: generated/'s registry searches the user cache, and the generated
    module imports the directory's configuration module beside it."""
    assert run("convert", mylm).exit_code == 0
    script = (
        "import generated, sys\n"
        "cls = generated.get_model_class('MyLMForCausalLM')\n"
        "print(cls.__module__)\n"
        "print(sys.modules[cls.__module__.rsplit('.', 1)[0] + '.configuration_mylm'].__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    module, config_file = done.stdout.split()
    assert module.startswith("hf2paged_modules.mylm_") and module.endswith(".mylm")
    assert Path(config_file).parent.parent == cache


def test_parity_with_transformers_on_the_directorys_code(mylm, reference):
    from hf2paged.model_source import prepare_model

    source = prepare_model(mylm, trust_remote_code=True)
    assert source.path == mylm and source.model_class.__name__ == "MyLMForCausalLM"
    tokens, ref = reference
    model = build_model(mylm, config=_config(mylm), model_class=source.model_class)
    result = compare("mylm", run_generated(model, tokens, SCENARIO), ref)
    assert result.max_diff < ATOL, result.format()
    # and through the command line
    verified = run("verify", mylm, "--trust-remote-code", "--decode-steps", "2")
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("MyLMForCausalLM: max |logit diff|")


def _tp_worker(rank: int, world_size: int, model_dir: str, tokens):
    from hf2paged.model_source import prepare_model

    # each rank finds the package its parent converted (no conversion, no PYTHONPATH)
    source = prepare_model(model_dir, trust_remote_code=True)
    model = build_model(
        model_dir, tp=world_size, config=_config(Path(model_dir)), model_class=source.model_class
    )
    records = run_generated(model, tokens, SCENARIO)
    for r in records:
        r.logits = r.logits.numpy()
    return records if rank == 0 else None


def test_parity_at_tp2_over_gloo(mylm, reference):
    from hf2paged.model_source import prepare_model

    prepare_model(mylm, trust_remote_code=True)  # converted here, found by the ranks
    tokens, ref = reference
    records = run_distributed(_tp_worker, 2, str(mylm), tokens, timeout=300)[0]
    for r in records:
        r.logits = torch.from_numpy(r.logits)
    result = compare("mylm TP=2", records, ref)
    assert result.max_diff < ATOL, result.format()


def _hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    hf = hf_model(model_dir)
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n
        )
    return out[0, len(prompt) :].tolist()


def test_llm_runs_the_directorys_code_at_tp1_and_tp2(mylm):
    """`LLM(dir, trust_remote_code=True)`: the engine gets the cached class (pickled by
    name to the spawned TP rank) and transformers' config code runs without a prompt."""
    from hf2paged import LLM, SamplingParams
    from runtime.parallel import get_tp_size

    prompt = [5, 6, 7, 8, 9, 10, 11]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = _hf_greedy(mylm, prompt, 6)
    with LLM(mylm, trust_remote_code=True, kv_cache_memory_bytes=1 << 20) as llm:
        assert type(llm.executor.worker.model).__module__.startswith("hf2paged_modules.mylm_")
        assert llm.generate([prompt], params, use_tqdm=False)[0].token_ids == expected
    with LLM(mylm, tensor_parallel_size=2, trust_remote_code=True,
             kv_cache_memory_bytes=1 << 20) as llm:  # fmt: skip
        assert get_tp_size() == 2
        assert llm.generate([prompt], params, use_tqdm=False)[0].token_ids == expected


def test_refused_in_one_line_without_the_flag(mylm, tmp_path, monkeypatch):
    from hf2paged import LLM
    from hf2paged.remote_code import RemoteCodeRefused
    from runtime.engine import LLM as EngineLLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    for args in (["generate", mylm, "-p", "hi"], ["verify", mylm], ["serve", mylm]):
        result = run(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert line.startswith(f"error: {mylm} carries its own model code")
        assert "--trust-remote-code" in line and "trust_remote_code=True" in line
    with pytest.raises(RemoteCodeRefused, match="trust_remote_code=True"):
        LLM(mylm)
    # the engine alone: transformers' config code is not run either, one line
    with pytest.raises(ValueError, match="carries its own configuration code"):
        EngineLLM(mylm)
    assert not (tmp_path / "empty-cache").exists()  # nothing converted


def test_an_edit_to_the_code_is_converted_again(tmp_path, monkeypatch):
    from hf2paged.model_source import prepare_model
    from hf2paged.verify.parity import verify_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model_dir = make_mylm_dir(tmp_path / "mylm_edit")
    before = prepare_model(model_dir, trust_remote_code=True).model_class
    modeling = model_dir / "modeling_mylm.py"
    text = modeling.read_text()
    assert text.count("        return down_proj\n") == 1
    modeling.write_text(
        text.replace("        return down_proj\n", "        return 0.5 * down_proj\n")
    )
    after = prepare_model(model_dir, trust_remote_code=True).model_class
    assert after.__module__ != before.__module__
    assert "0.5 * down_proj" in Path(sys.modules[after.__module__].__file__).read_text()
    # An edit to the configuration module (a sibling) is a new version of the code too.
    # (It also makes transformers, in this process, build the edited model: it keeps the
    # model class it registered for an unchanged config class.)
    config_file = model_dir / "configuration_mylm.py"
    config_file.write_text(config_file.read_text() + "\n# edited\n")
    latest = prepare_model(model_dir, trust_remote_code=True).model_class
    assert latest.__module__ not in (before.__module__, after.__module__)
    packages = list((tmp_path / "xdg" / "hf2paged" / "modules" / "hf2paged_modules").iterdir())
    assert len(packages) == 3
    # transformers runs the edited code too: still at parity (and far from the unedited)
    report = verify_model_dir(model_dir, decode_steps=2, model_class=latest, trust_remote_code=True)
    assert report.max_diff < ATOL, report.format()
    stale = verify_model_dir(model_dir, decode_steps=2, model_class=before, trust_remote_code=True)
    assert stale.max_diff > 100 * ATOL, stale.format()


def test_a_modeling_file_with_its_siblings_copied_from_transformers(tmp_path):
    """Climbing relative imports (`from ...activations`) resolve in transformers; the
    sibling configuration module is written beside the generated one, its own climbing
    imports made absolute; --out DIR is an importable package."""
    src = tmp_path / "src"
    write_code(src, copied_style=True)
    out = tmp_path / "pkg_out"
    result = run("convert", src / "modeling_mylm.py", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.py")) == [
        "__init__.py", "configuration_mylm.py", "mylm.py",
    ]  # fmt: skip
    config_text = (out / "configuration_mylm.py").read_text()
    assert "from transformers.configuration_utils import PreTrainedConfig" in config_text
    assert "from ..." not in config_text
    script = "import pkg_out; print(pkg_out.get_model_class('MyLMForCausalLM').__module__)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pkg_out.mylm"


def test_check_leaves_conversions_of_outside_code_alone(mylm, tmp_path, monkeypatch):
    import converter.convert as convert_mod

    monkeypatch.setattr(convert_mod, "architectures", lambda rules=None: ["qwen2"])
    out = tmp_path / "out"
    assert run("convert", "qwen2", "--out", out).exit_code == 0
    assert run("convert", mylm, "--out", out).exit_code == 0
    checked = run("check", "--out", out)
    assert checked.exit_code == 0, checked.output
    assert "note: mylm.py was converted from modeling_mylm.py" in checked.stderr
    assert "up to date (1 architectures)" in checked.stderr


def test_serve_with_the_flag_loads_the_directorys_code(mylm, monkeypatch):
    """`serve --trust-remote-code`: the engine process behind the server builds the cached
    class and generates with it (the HTTP side is tests/hf2paged/serve/'s; uvicorn is not
    started here)."""
    import asyncio

    import hf2paged.serve.command as command
    from runtime.engine import SamplingParams
    from runtime.engine.engine_process import EngineProcess

    served = {}

    class Recorded(EngineProcess):
        def __init__(self, make_llm, **kwargs):
            served["model"] = make_llm.keywords["model_class"]
            super().__init__(make_llm, **kwargs)

    def run_app(app, host, port, log_level):
        async def generate():
            async with app.state.server.engine as engine:
                stream = engine.add_request(
                    [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)
                )
                served["tokens"] = [u.num_output_tokens async for (u,) in stream][-1]

        asyncio.run(generate())

    monkeypatch.setattr(command, "_run", run_app)
    monkeypatch.setattr("runtime.engine.engine_process.EngineProcess", Recorded)
    result = run(
        "serve", mylm, "--trust-remote-code", "--device", "cpu", "--kv-cache-memory-mib", "1"
    )
    assert result.exit_code == 0, result.output
    assert served["model"].__module__.startswith("hf2paged_modules.mylm_")
    assert served["tokens"] == 3
