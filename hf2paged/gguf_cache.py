"""GGUF files as model directories: converted once with transformers' own GGUF support,
saved as safetensors + tokenizer under the user cache (`user_cache.py`), and reused.

Reading a GGUF file dequantizes every tensor and parses its whole vocabulary (about
38 s for SmolLM2-135M on a 2-core machine); a cached directory loads in a second. The
demo, `generate`, `verify`, `serve` and `hf2paged.LLM` all go through
`ensure_hf_model_dir`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path

from hf2paged.quiet import quiet_transformers
from hf2paged.user_cache import build_once, user_cache_dir

# Bump when the conversion's output changes, so stale cached directories are not reused.
CACHE_FORMAT = 1


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
    convert = convert_gguf_to_hf if convert is None else convert
    return final, build_once(final, "config.json", lambda tmp: convert(gguf, tmp, log))


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

    # Our own progress lines replace transformers' bars and its "dequantizing" warning.
    with quiet_transformers(), _parse_gguf_once():
        log(f"converting {gguf.name} to a safetensors model dir (once; cached in {out_dir.parent})")
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
