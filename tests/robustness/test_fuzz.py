"""Fuzz: mutated real modeling files (a statement deleted, an attribute renamed at one
use or at every use, two call arguments swapped) never make the converter crash.

The oracle, per mutated file:
- the converter raises a plain `ConversionError` whose text is one line (not the
  catch-all `InternalConversionError`: an exception no pass anticipated is a bug to fix
  where it happens); or
- it returns a module that compiles and executes in a fresh namespace (imports, class
  bodies, decorators). A mutation that already breaks the SOURCE at import time (e.g.
  `nn.Module` renamed in a class's bases) may be carried into the output: the converter
  does not import the code it converts, so it cannot see that attribute is missing.

CI runs a few derandomized examples per file; `-m slow` runs many more.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest
from cli_helpers import source_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import KINDS, mutate

from converter.convert import generate
from converter.errors import ConversionError, InternalConversionError

MUTATIONS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(min_value=0, max_value=10**6)),
    min_size=1,
    max_size=2,
)


def _import(path: Path, name: str) -> None:
    """Import `path` as module `name` (a real module: transformers' decorators read
    their class's source file), then forget it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]


def check_mutated(model_type: str, mutations: list[tuple[str, int]]) -> str:
    """Convert one mutated copy of `model_type`'s modeling file; returns the outcome."""
    text, done = source_of(model_type), []
    for kind, index in mutations:
        text, what = mutate(text, kind, index)
        done.append(what)
    with tempfile.TemporaryDirectory() as tmp:
        # named modeling_<type>.py: relative imports resolve to transformers.models.<type>
        path = Path(tmp) / f"modeling_{model_type}.py"
        path.write_text(text)
        try:
            generated = generate(str(path))
        except InternalConversionError as e:
            pytest.fail(f"{done}: converter bug behind the catch-all: {e}")
        except ConversionError as e:
            assert "\n" not in str(e), (done, str(e))
            return "error"
        out = Path(tmp) / f"fuzz_{model_type}.py"
        out.write_text(generated.text)
        compile(generated.text, str(out), "exec")
        try:
            _import(out, f"generated._fuzz_{model_type}")
        except Exception as e:  # noqa: BLE001 — decide below whose fault it is
            try:
                _import(path, f"transformers.models.{model_type}._fuzz_source")
            except Exception:  # noqa: BLE001 — the source is broken at import time too
                return "source does not import"
            pytest.fail(f"{done}: converted module fails to import: {type(e).__name__}: {e}")
    return "converted"


# 7 derandomized examples per file already draw every mutation kind, alone and paired
# (delete, swap_args, delete+swap_args, rename_one, rename_all, rename_one x2); 12 added
# only repeats of those kinds. `-m slow` runs 60 random ones over 8 architectures.
@pytest.mark.parametrize("model_type", ["llama", "opt"])
@settings(
    max_examples=7,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutations=MUTATIONS)
def test_mutations_never_crash(model_type, mutations):
    check_mutated(model_type, mutations)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type", ["llama", "opt", "mistral", "qwen3", "gemma2", "phi3", "bloom", "gpt2"]
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=MUTATIONS)
def test_mutations_never_crash_long(model_type, mutations):
    check_mutated(model_type, mutations)


def test_the_oracle_catches_a_broken_output(monkeypatch):
    """The check fails when the converter emits code that cannot import."""
    import converter.convert as convert_module

    real = convert_module.generate

    def broken(target, *args, **kwargs):
        result = real(target, *args, **kwargs)
        result.text += "\nfrom torch import no_such_name_here\n"
        return result

    monkeypatch.setattr(convert_module, "generate", broken)
    monkeypatch.setitem(globals(), "generate", broken)
    with pytest.raises(pytest.fail.Exception, match="fails to import"):
        check_mutated("llama", [])  # no mutation: only the appended import is wrong
