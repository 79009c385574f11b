"""Which runs a throughput invocation makes, and what it keeps between invocations
(`--keep-dir`): the saved random model and each system's result."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from hf2paged.bench import RunResult, save_random_model


def system_runs(args: argparse.Namespace) -> list[tuple[str, str, int, dict[str, str]]]:
    """(result key, system, tp, extra worker environment) for each run: ours once per TP
    size and `--compile` setting ("ours" alone when there is one of each, else
    "ours-tp<N>" / "-compile<C>" suffixes; HF2PAGED_COMPILE=<C> in its worker; "-run<i>"
    for each of `--repeat` runs), each HF baseline once."""
    runs = []
    settings = getattr(args, "compile_settings", ["auto"])
    for system in args.systems:
        if system != "ours":
            runs.append((system, system, 1, {}))
            continue
        repeats = getattr(args, "repeat", 1)
        for t in args.tp_sizes:
            for c in settings:
                key = "ours" + (f"-tp{t}" if len(args.tp_sizes) > 1 else "")
                key += f"-compile{c}" if len(settings) > 1 else ""
                env = {} if c == "auto" else {"HF2PAGED_COMPILE": c}
                for i in range(1, repeats + 1):
                    runs.append((key + (f"-run{i}" if repeats > 1 else ""), "ours", t, env))
    return runs


def prepare_model(args, config, dtype, keep: Path | None, tmp: Path) -> Path:
    """The saved random model: reused from --keep-dir when it was built for the same
    shape, dtype and seed, else built (and kept there when --keep-dir is given)."""
    stamp = json.dumps(
        {
            "model": args.model,
            "layers": getattr(args, "num_layers", None),
            "dtype": args.dtype,
            "seed": args.seed,
        }
    )
    model_dir = (keep or tmp) / "model"
    if keep is not None and (keep / "model.stamp").exists():
        if (keep / "model.stamp").read_text() == stamp and (model_dir / "config.json").exists():
            print(f"reusing the random model in {model_dir}", flush=True)
            return model_dir
        # Another model: neither its weights nor its results belong to this run.
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(keep / "results", ignore_errors=True)
    start = time.perf_counter()
    save_random_model(config, model_dir, dtype, args.device, args.seed)
    print(f"random weights saved in {time.perf_counter() - start:.1f} s", flush=True)
    if keep is not None:
        (keep / "model.stamp").write_text(stamp)
    return model_dir


def earlier_results(keep: Path | None, workload_key: str) -> dict[str, RunResult]:
    """Results that earlier invocations kept for the same workload (see --keep-dir)."""
    if keep is None or not (keep / "results").is_dir():
        return {}
    found = {}
    for path in sorted((keep / "results").glob("*.json")):
        saved = json.loads(path.read_text())
        if saved.get("workload") == workload_key:
            found[path.stem] = RunResult.from_json(json.dumps(saved["result"]))
    return found


def ordered(results: dict) -> dict:
    """Rows in a fixed order whichever invocation measured them: ours (by TP size), then
    HF continuous batching, then HF generate."""
    rank = {"hf-cb": 1, "hf-generate": 2}
    return dict(sorted(results.items(), key=lambda kv: (rank.get(kv[0], 0), kv[0])))
