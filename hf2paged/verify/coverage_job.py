"""One architecture's coverage check, run inside a worker process.

convert (in memory, never touching generated/) -> tiny random HF model, saved with
`save_pretrained` to a temp dir -> import the generated module from a temp dir ->
build it and load the checkpoint through its own `load_weights` (`build_model`) -> logits of a
mixed-length prefill, decode steps through the paged cache and a chunked prefill,
against HF eager (hf2paged/verify/parity.py). Every failure becomes an `Outcome` with the
stage it happened in and one line of reason; nothing escapes to the pool.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from converter.errors import ConversionError

ATOL = 1e-4  # relative to the logit scale: |diff| <= ATOL * max(1, max |HF logit|)
NOISE = 0.05  # added to every HF parameter, so norm weights/biases are not 1/0
MAX_PARAMS = 20_000_000  # a "tiny" config bigger than this is a missing quirk


@dataclass
class Outcome:
    model_type: str
    converted: bool | None = None  # None: not reached
    parity: bool | None = None
    max_diff: float | None = None
    tolerance: float | None = None
    # where it failed: convert, config, hf, import, build (incl. loading the weights), run,
    # parity, timeout, crash
    stage: str = ""
    reason: str = ""
    seconds: float = 0.0


class _Timeout(BaseException):
    """Raised by SIGALRM inside whatever the job is running. A BaseException, like
    KeyboardInterrupt, so the converter's last-line-of-defence handler (which turns any
    Exception into a ConversionError) cannot relabel a timeout as a conversion failure."""


def one_line(exc: BaseException) -> str:
    """The converter's own error text, or the exception's type and first line; paths
    into the installed transformers shortened to `models/...`."""
    from converter.hf.resolve import transformers_root
    from converter.render import REPO_ROOT

    if isinstance(exc, ConversionError):
        text = str(exc)
    else:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        # HF wraps config validation errors; their cause is on the next line.
        if len(lines) > 1 and lines[0].endswith(":"):
            text = f"{text} {lines[1]}"
        text += _where(exc)
    text = text.replace(f"{transformers_root()}/", "").replace(f"{REPO_ROOT}/", "")
    return text if len(text) <= 400 else text[:397] + "..."


def _where(exc: BaseException) -> str:
    """` (at <file>:<line> `code`)` of the innermost frame in the generated module (else
    the innermost frame): where to look, without a traceback."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if Path(f.filename).name.startswith("_hf2paged_coverage_")]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return ""
    name = Path(frame.filename).name
    if name.startswith("_hf2paged_coverage_"):
        name = "generated " + name[len("_hf2paged_coverage_") :]
    code = f" `{frame.line.strip()}`" if frame.line else ""
    return f" (at {name}:{frame.lineno}{code})"


def init_worker() -> None:
    """Pool initializer: one thread per worker (the pool is the parallelism), quiet HF."""
    import warnings

    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def _raise_timeout(signum, frame):
    raise _Timeout


def mark_started(marker_dir: str | None, model_type: str) -> None:
    """Tell the parent this job started, and which process to stop if it hangs."""
    if marker_dir:
        Path(marker_dir, model_type).write_text(str(os.getpid()))


def check(model_type: str, architecture: str, timeout: float, marker_dir: str | None) -> dict:
    """The Outcome (as a dict, picklable) of one model type; never raises."""
    start = time.perf_counter()
    mark_started(marker_dir, model_type)
    out = Outcome(model_type)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with tempfile.TemporaryDirectory(prefix=f"hf2paged-cov-{model_type}-") as tmp:
            _check(model_type, architecture, Path(tmp), out)
    except _Timeout:
        out.stage, out.reason = "timeout", f"no result after {timeout:g} s (--timeout)"
    except Exception as e:  # noqa: BLE001 — e.g. the converter itself fails to import
        out.stage, out.reason = "internal", one_line(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    out.seconds = round(time.perf_counter() - start, 2)
    return asdict(out)


def _stage(out: Outcome, name: str, fn, *args):
    """Run one stage; on failure record it and return None (a timeout passes through)."""
    try:
        return fn(*args)
    except _Timeout:
        raise
    except BaseException as e:  # noqa: BLE001 — any failure is a row of the report
        if isinstance(e, KeyboardInterrupt):
            raise
        out.stage, out.reason = name, one_line(e)
        return None


def _check(model_type: str, architecture: str, tmp: Path, out: Outcome) -> None:
    import transformers

    from converter.convert import generate
    from hf2paged.verify.coverage_config import tiny_config
    from hf2paged.verify.coverage_rules import load_coverage_rules

    hf_cls = _stage(out, "config", getattr, transformers, architecture)
    if hf_cls is None:
        return
    source = Path(sys.modules[hf_cls.__module__].__file__)
    generated = _stage(out, "convert", generate, str(source))
    out.converted = generated is not None
    if generated is None:
        return
    config = _stage(
        out, "config", tiny_config, model_type, hf_cls.config_class, load_coverage_rules()
    )
    if config is None:
        return
    case = _stage(out, "hf", hf_case, hf_cls, config, tmp / "checkpoint")
    if case is None:
        return
    module = _stage(out, "import", _import, generated.text, tmp / "module", model_type)
    if module is None:
        return
    model = _stage(out, "build", _build, module, hf_cls, tmp / "checkpoint")
    if model is None:
        return
    report = _stage(out, "run", _run, model, case)
    if report is None:
        return
    tokens, reference = case
    scale = max(float(r.abs().max()) for r in reference)
    out.max_diff, out.tolerance = report.max_diff, ATOL * max(1.0, scale)
    out.parity = report.max_diff <= out.tolerance
    if not out.parity:
        out.stage = "parity"
        out.reason = (
            f"max |logit diff| {report.max_diff:.3g} > {out.tolerance:.3g}: {report.format()}"
        )


def scenario():
    from hf2paged.verify.parity import Scenario

    # 3 prompts (5, 9, 3 tokens: longer than the sliding windows of 4), 3 decode steps,
    # then a chunked prefill mixed with decodes; blocks of 4 tokens.
    return Scenario(prompt_lens=(5, 9, 3), decode_steps=3, chunks=(4, 3), block_size=4)


def hf_case(hf_cls, config, model_dir: Path, tweak=None, **save_kwargs):
    """A tiny random HF model of `config` (every parameter perturbed, and every floating
    persistent buffer: checkpoint state such as a router's correction bias), saved to
    `model_dir`; returns the scenario's tokens and HF's logits of them (also used by
    tests/parity/test_parity_shipped.py). `tweak(model)` runs before saving;
    `save_kwargs` go to `save_pretrained` (`save_original_format=False`: transformers'
    own layout, fused MoE experts, instead of the checkpoint's original one)."""
    import torch

    from hf2paged.verify.parity import hf_reference

    with torch.device("meta"):
        meta = hf_cls._from_config(config, attn_implementation="eager")
    params = sum(p.numel() for p in meta.parameters())
    if params > MAX_PARAMS:
        raise ValueError(
            f"tiny config still has {params / 1e6:.0f}M parameters: add a quirk to rules/coverage.toml [tiny.types]"
        )
    torch.manual_seed(0)
    hf = hf_cls._from_config(config, attn_implementation="eager").eval()
    state = set(hf.state_dict())
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p), alpha=NOISE)
        for name, buffer in hf.named_buffers():
            if name in state and buffer.is_floating_point():
                buffer.add_(torch.randn_like(buffer), alpha=NOISE)
        if tweak is not None:
            tweak(hf)
    hf.save_pretrained(model_dir, **save_kwargs)
    tokens = scenario().tokens(config.vocab_size)
    return tokens, hf_reference(hf, tokens)


def _import(text: str, directory: Path, model_type: str):
    directory.mkdir()
    name = f"_hf2paged_coverage_{model_type.replace('-', '_')}"
    path = directory / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _build(module, hf_cls, model_dir: Path):
    """The converted class built and loaded from the checkpoint, as serving does
    (`build_model`), with the config read back from it (save_pretrained leaves the
    in-memory one with string dtypes)."""
    from runtime.engine.build_model import build_model

    cls = getattr(module, hf_cls.__name__, None)
    if cls is None:
        raise AttributeError(f"the generated module has no class {hf_cls.__name__}")
    config = hf_cls.config_class.from_pretrained(model_dir)
    return build_model(model_dir, config=config, model_class=cls)


def _run(model, case):
    from hf2paged.verify.parity import compare, run_generated

    tokens, reference = case
    records = run_generated(model, tokens, scenario())
    return compare(type(model).__name__, records, reference)
