"""HTTP serving throughput: the throughput workload sent to `hf2paged serve` by concurrent
streaming clients, against the same engine offline, in the same run (GPU; CPU smoke run).

    python benchmarks/serve.py                        # Qwen3-0.6B shape, 256 requests, 256 clients
    python benchmarks/serve.py --model llama3-8b
    python benchmarks/serve.py --quick --device cpu   # smoke test: tiny model, 8 short requests
    python benchmarks/serve.py --fake-engine          # the HTTP side alone, on a stand-in engine

Workload and model are `benchmarks/throughput.py`'s (nano-vllm's: 256 requests of random
token ids, input and output lengths uniform in 100..1024, greedy, every request generating
exactly its output length; random weights of the real config, saved once). Offline: the
engine's own row of throughput.py (`LLM.add_request` + `step` in a subprocess, the same
warm-up), `--repeats` times. HTTP: one `hf2paged serve` process on the same directory with
the same engine settings; after the same warm-up, `--clients` concurrent clients (httpx,
one connection each) stream `/v1/completions` with the prompt as token ids, `ignore_eos` and
`return_token_ids` (the random model has no tokenizer, so tokens are counted from the ids),
taking requests from one shared queue; `--repeats` times. TTFT counts from the moment the
run starts (all requests submitted at once, as offline); ITL is every gap between two
tokens of a request as the client receives them. The report (device name, both systems,
their ratio and spread) goes to benchmarks/results/serve-<device>[-<model>].md.

`--fake-engine` measures what the HTTP side alone sustains: the same clients against a
server on `benchmarks/fake_engine.py`'s stand-in engine, which gives every running request
one token per `--fake-step-ms` and holds the interpreter lock `--fake-host-ms` of each
step, as the real engine's Python work does (no GPU, no model; `--tokenizer DIR` streams
real text through the detokenizer). Reported: tokens/s the clients received against the
tokens/s the stand-in offered, and the CPU time of the server's processes and of the
clients (this machine's load beside it), to benchmarks/results/serve-fake-<device>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.runs import prepare_model  # noqa: E402
from benchmarks.throughput import device_slug, run_system, workload_for  # noqa: E402
from hf2paged.bench import (  # noqa: E402
    CPU_KV_CACHE_BYTES,
    Request,
    RunResult,
    format_result,
    latencies_from_timestamps,
    percentile,
    preset_config,
)

WARMUP_REQUESTS = 4  # as hf2paged.bench.run_ours: first-call costs are not throughput
READY = "hf2paged serve: ready at "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, choices=["qwen3-0.6b", "llama3-8b", "tiny"],
                   help="model shape (default qwen3-0.6b; tiny with --quick)")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="tiny model, 8 short requests: a smoke test"
    )
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bf16 on GPU, fp32 on CPU")  # fmt: skip
    p.add_argument("--num-requests", type=int, default=None, help="default 256 (8 with --quick)")
    p.add_argument("--min-len", type=int, default=None, help="default 100 (8 with --quick)")
    p.add_argument("--max-len", type=int, default=None, help="default 1024 (32 with --quick)")
    p.add_argument("--clients", type=int, default=None,
                   help="concurrent streaming clients (default: one per request)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="runs of each system (the spread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--system-timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--fake-engine", action="store_true",
                   help="the HTTP side alone, on benchmarks/fake_engine.py's stand-in engine")  # fmt: skip
    p.add_argument("--fake-step-ms", type=float, default=8.0,
                   help="--fake-engine: one step (256 requests / 8 ms = 32k tok/s offered)")  # fmt: skip
    p.add_argument("--fake-host-ms", type=float, default=3.0,
                   help="--fake-engine: the engine's Python work per step (holds the GIL)")  # fmt: skip
    p.add_argument("--fake-in-process", action="store_true",
                   help="--fake-engine: step the stand-in on a thread of the server's process "
                        "(AsyncLLM(llm), the Python API's arrangement) instead of its own process")  # fmt: skip
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="--fake-engine: a model directory whose tokenizer makes the text")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help="report path (default benchmarks/results/serve-<device>[-<model>].md)")  # fmt: skip
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "qwen3-0.6b")
    args.num_requests = args.num_requests or (8 if args.quick else 256)
    args.min_len = args.min_len or (8 if args.quick else 100)
    args.max_len = args.max_len or (32 if args.quick else 1024)
    args.clients = args.clients or args.num_requests
    if args.tokenizer is not None and not args.fake_engine:
        p.error("--tokenizer goes with --fake-engine (the random models have none)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.repeats < 1 or args.clients < 1:
        p.error("--repeats and --clients must be >= 1")
    # What benchmarks/throughput.py's run_system and model_config need (the full shape, tp=1).
    args.tp, args.hf_batch_size, args.hf_generate_batches = 1, 64, 0
    args.num_layers = None
    # Offline runs with the server's token budget, so that the two differ only by HTTP.
    from runtime.engine.config import default_token_budget

    args.max_num_batched_tokens = default_token_budget(torch.device(args.device).type, serving=True)
    return args


# ---------------------------------------------------------------------- the server
def serve_command(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """`hf2paged serve` on the saved model with the offline engine's settings."""
    cmd = [sys.executable, "-m", "hf2paged.cli", "serve", str(model_dir), "--port", "0"]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--log-level", "warning"]
    cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--max-waiting-requests", str(max(1024, 2 * args.num_requests))]
    cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if not args.device.startswith("cuda"):  # hf2paged.bench.run_ours' CPU budget
        cmd += ["--kv-cache-memory-mib", str(CPU_KV_CACHE_BYTES >> 20)]
    return cmd


def fake_serve_command(args: argparse.Namespace) -> list[str]:
    """The server on benchmarks/fake_engine.py's stand-in engine."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "fake_engine.py"), "--port", "0"]
    cmd += ["--step-ms", str(args.fake_step_ms), "--host-ms", str(args.fake_host_ms)]
    cmd += ["--max-waiting-requests", str(max(1024, 2 * args.num_requests))]
    if args.tokenizer is not None:
        cmd += ["--tokenizer", str(args.tokenizer)]
    if args.fake_in_process:
        cmd += ["--in-process"]
    return cmd


class Server:
    """A server process (`cmd`), ready once it prints its URL."""

    def __init__(self, cmd: list[str], timeout: float) -> None:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        print(f"\n== server: {' '.join(cmd[1:])}", flush=True)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.url: str | None = None
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start (its output is above)")

    def cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system) of the server process and its descendants, by pid."""
        return process_tree_cpu(self.proc.pid)

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            print(f"  [server] {line}", end="", flush=True)
            if line.startswith(READY):
                self.url = line[len(READY) :].strip()
                ready.set()
        ready.set()

    def metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.labels
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def process_tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of `pid` and its living descendants, by pid (Linux
    /proc; empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found: dict[int, float] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            found[p] = (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return found


def process_role(pid: int, server_pid: int) -> str:
    """What a process of the server's tree is, for the CPU notes."""
    if pid == server_pid:
        return "API server"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    if "resource_tracker" in cmd:
        return "resource tracker"
    return "engine" if "spawn_main" in cmd else f"pid {pid}"


def cpu_note(server: Server, cpu0: dict[int, float], cpu1: dict[int, float], client_cpu: float,
             elapsed: float) -> str:  # fmt: skip
    """CPU seconds per second of run of each server process and of the clients."""
    parts = [
        f"{process_role(pid, server.proc.pid)} {(cpu1[pid] - cpu0.get(pid, 0.0)) / elapsed:.2f}"
        for pid in sorted(cpu1)
    ]
    return ", ".join([*parts, f"clients {client_cpu / elapsed:.2f}"])


def machine_load() -> str:
    try:
        return "load average " + " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


# ---------------------------------------------------------------------- the clients
async def stream_requests(
    url: str, workload: list[Request], clients: int
) -> tuple[float, list[list[float]]]:
    """Every request of `workload` streamed by `clients` concurrent clients; returns the
    run's start time and each request's token arrival times."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pending = list(reversed(list(enumerate(workload))))
    token_times: list[list[float]] = [[] for _ in workload]

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            i, r = pending.pop()
            body = {
                "prompt": r.prompt_token_ids, "max_tokens": r.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True,
            }  # fmt: skip
            async with http.stream("POST", "/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(
                        f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                    )
                times = token_times[i]
                rest = b""
                # Events split by hand: httpx's line iterator costs the clients more than
                # the parsing (on a small machine the clients share the server's cores).
                async for data in response.aiter_raw():
                    *events, rest = (rest + data).split(b"\n\n")
                    now = time.perf_counter()
                    for event in events:
                        if not event.startswith(b"data: {"):
                            continue
                        chunk = json.loads(event[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"stream error: {chunk['error']['message']}")
                        new = sum(len(c.get("token_ids") or ()) for c in chunk["choices"])
                        times.extend([now] * new)
            if len(times) != r.max_tokens:
                raise RuntimeError(f"request {i}: {len(times)} tokens, expected {r.max_tokens}")

    async with httpx.AsyncClient(base_url=f"{url}/v1", limits=limits, timeout=None) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return start, token_times


def run_http(server: Server, workload: list[Request], clients: int, name: str) -> RunResult:
    start, token_times = asyncio.run(stream_requests(server.url, workload, clients))
    elapsed = max(t[-1] for t in token_times if t) - start
    ttft, itl = latencies_from_timestamps(start, token_times)
    return RunResult(
        name=name, num_requests=len(workload),
        input_tokens=sum(len(r.prompt_token_ids) for r in workload),
        output_tokens=sum(len(t) for t in token_times), elapsed_s=elapsed, ttft_s=ttft, itl_s=itl,
    )  # fmt: skip


# ---------------------------------------------------------------------- the report
def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1e3:,.1f}"


def spread(results: list[RunResult]) -> str:
    tps = [r.output_tps for r in results]
    if len(tps) < 2:
        return f"{tps[0]:,.0f}"
    return f"median {statistics.median(tps):,.0f} (min {min(tps):,.0f}, max {max(tps):,.0f})"


def write_report(out: Path, args, slug: str, config, workload, offline, http, server_notes) -> None:
    import transformers

    lines = [
        f"# Serving over HTTP: {args.model} shape on {slug}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}.",
        f"Command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`",
        "",
        f"Workload (benchmarks/throughput.py's): {len(workload)} requests, random token ids, input and "
        f"output lengths uniform in {args.min_len}..{args.max_len} (seed {args.seed}): "
        f"{sum(len(r.prompt_token_ids) for r in workload):,} input and "
        f"{sum(r.max_tokens for r in workload):,} output tokens; greedy, every request generates "
        f"exactly its output length. Model: {config.model_type} with random weights in {args.dtype}. "
        f"Offline: the engine in its own process (`LLM.add_request` + `step`). HTTP: "
        f"`hf2paged serve` (the engine in a process of its own, as offline, beside the API "
        f"server's) with the same engine settings and {args.clients} concurrent streaming "
        f"clients (`/v1/completions`, token-id prompts), in another process.",
        "",
        "| system | run | output tok/s | total tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, results in (("offline", offline), ("HTTP", http)):
        for i, r in enumerate(results):
            if isinstance(r, str):
                lines.append(f"| {label} | {i + 1} | {r} | | | |")
                continue
            lines.append(
                f"| {r.name} | {i + 1} | {r.output_tps:,.0f} | {r.total_tps:,.0f} | "
                f"{_ms(r.ttft_s, 50)} / {_ms(r.ttft_s, 99)} | {_ms(r.itl_s, 50)} / {_ms(r.itl_s, 99)} |"
            )
    ok_offline = [r for r in offline if isinstance(r, RunResult)]
    ok_http = [r for r in http if isinstance(r, RunResult)]
    if ok_offline and ok_http:
        ratio = statistics.median(r.output_tps for r in ok_http) / statistics.median(
            r.output_tps for r in ok_offline
        )
        verdict = "within" if ratio >= 0.9 else "NOT within"
        lines += [
            "",
            f"Output tok/s: offline {spread(ok_offline)}, HTTP {spread(ok_http)}. "
            f"**HTTP / offline = {ratio:.3f}** (medians): {verdict} 10% of offline.",
        ]
    lines += [
        "",
        "TTFT counts from the moment all requests are submitted (later requests wait for room in "
        "the batch); ITL is every gap between two consecutive tokens of one request (offline: "
        "when the engine returns them; HTTP: when the client receives them, so tokens that "
        "arrive in one chunk have a gap of 0).",
    ]
    if not args.device.startswith("cuda"):
        server_notes = [
            "- CPU smoke run: it shows the benchmark works end to end; with a tiny model on a "
            "shared CPU its numbers say nothing about serving speed.",
            *server_notes,
        ]
    if server_notes:
        lines += ["", "## Notes", "", *server_notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


# ---------------------------------------------------------------------- --fake-engine
def fake_offline_seconds(workload: list[Request], clients: int, max_num_seqs: int, step_s: float):
    """How long the stand-in engine alone takes for `workload`: `min(clients, max_num_seqs)`
    requests run at once, one token each per step, a finished one replaced at the next step."""
    lengths = [r.max_tokens for r in workload]
    width = min(clients, max_num_seqs)
    running, queue, steps = lengths[:width], lengths[width:], 0
    while running:
        steps += 1
        running = [n - 1 for n in running if n > 1]
        while queue and len(running) < width:
            running.append(queue.pop(0))
    return steps * step_s


def run_fake(args: argparse.Namespace, out: Path) -> None:
    import transformers

    workload = workload_for(args)
    total = sum(r.max_tokens for r in workload)
    offline = total / fake_offline_seconds(workload, args.clients, 256, args.fake_step_ms / 1e3)
    rows: list[str] = []
    loads = [machine_load()]

    def report() -> None:
        lines = [
            f"# The HTTP side alone: `hf2paged serve` on a stand-in engine, on the host of "
            f"{device_slug(args.device)} (CPU only)",
            "",
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {os.cpu_count()} "
            f"CPUs ({platform.processor() or platform.machine()}); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}; "
            f"machine {loads[0]} before the runs, {loads[-1]} after.",
            f"Command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`",
            "",
            f"Stand-in engine (benchmarks/fake_engine.py): every running request (at most 256) "
            f"gets one token per {args.fake_step_ms:g} ms step, of which {args.fake_host_ms:g} ms "
            f"hold the interpreter lock (the engine's Python work); the stand-in steps "
            + (
                "on a thread of the server's process (`--fake-in-process`); "
                if args.fake_in_process
                else "in a process of its own, as `hf2paged serve`'s engine; "
            )
            + (
                f"tokens are text of {args.tokenizer.name}'s tokenizer (detokenized as served). "
                if args.tokenizer
                else "no tokenizer: token ids only (as the GPU benchmark). "
            )
            + f"Workload: {len(workload)} requests, output lengths uniform in "
            f"{args.min_len}..{args.max_len} ({total:,} tokens), {args.clients} concurrent "
            f"streaming httpx clients (`/v1/completions`, token-id prompts, `return_token_ids`). "
            f"The stand-in alone would deliver {offline:,.0f} tok/s (its steps counted for this "
            f"workload). CPU: seconds of CPU per second of run, per process (1.0 = one core busy).",
            "",
            "| run | output tok/s | HTTP / stand-in alone | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
            "| server CPU (per process) | clients CPU |",
            "|---:|---:|---:|---:|---:|---|---:|",
            *rows,
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(out)

    server = Server(fake_serve_command(args), args.system_timeout)
    try:
        warm = [Request(r.prompt_token_ids, 8) for r in workload[:WARMUP_REQUESTS]]
        asyncio.run(stream_requests(server.url, warm, len(warm)))
        for i in range(args.repeats):
            print(f"\n== HTTP run {i + 1}", flush=True)
            cpu0, client0 = server.cpu_seconds(), time.process_time()
            result = run_http(server, workload, args.clients, "fake")
            cpu1, client1 = server.cpu_seconds(), time.process_time()
            loads.append(machine_load())
            per_proc = [(cpu1[pid] - cpu0.get(pid, 0.0)) / result.elapsed_s for pid in sorted(cpu1)]
            print(format_result(result), flush=True)
            rows.append(
                f"| {i + 1} | {result.output_tps:,.0f} | {result.output_tps / offline:.3f} | "
                f"{_ms(result.ttft_s, 50)} / {_ms(result.ttft_s, 99)} | "
                f"{_ms(result.itl_s, 50)} / {_ms(result.itl_s, 99)} | "
                f"{' + '.join(f'{c:.2f}' for c in per_proc)} | "
                f"{(client1 - client0) / result.elapsed_s:.2f} |"
            )
            report()
    finally:
        server.stop()
    print(f"\nreport: {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.fake_engine:
        name = f"serve-fake-{device_slug(args.device)}" + ("-text" if args.tokenizer else "")
        name += "-in-process" if args.fake_in_process else ""
        return run_fake(args, args.out or REPO / "benchmarks" / "results" / f"{name}.md")
    workload = workload_for(args)
    config = preset_config(args.model)
    slug = device_slug(args.device)
    name = f"serve-{slug}" + ("" if args.model == "qwen3-0.6b" else f"-{args.model}")
    out = args.out or REPO / "benchmarks" / "results" / (
        name + ("-quick" if args.quick else "") + ".md"
    )
    print(
        f"{args.model} ({args.dtype}) on {slug}: {len(workload)} requests, lengths "
        f"{args.min_len}..{args.max_len}, {args.clients} clients, {args.repeats} runs each",
        flush=True,
    )
    offline: list[RunResult | str] = []
    http: list[RunResult | str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hf2paged-serve-bench-") as tmp:
        model_dir = prepare_model(args, config, getattr(torch, args.dtype), None, Path(tmp))
        # One offline run before the server and the others after it (each run writes the
        # report: a run cut short still has both systems measured).
        offline.append(run_system("offline-0", "ours", 1, args, model_dir, Path(tmp)))
        write_report(out, args, slug, config, workload, offline, http, notes)
        server = Server(serve_command(args, model_dir), args.system_timeout)
        try:
            warm = [Request(r.prompt_token_ids, 8) for r in workload[:WARMUP_REQUESTS]]
            asyncio.run(stream_requests(server.url, warm, len(warm)))
            before = server.metrics()
            for i in range(args.repeats):
                print(f"\n== HTTP run {i + 1}", flush=True)
                try:
                    cpu0, client0 = server.cpu_seconds(), time.process_time()
                    result = run_http(
                        server,
                        workload,
                        args.clients,
                        f"hf2paged serve ({args.clients} streaming clients)",
                    )
                    cpu1, client1 = server.cpu_seconds(), time.process_time()
                    cpu = cpu_note(server, cpu0, cpu1, client1 - client0, result.elapsed_s)
                    notes.append(f"- HTTP run {i + 1}, CPU seconds per second of run: {cpu}.")
                    print(format_result(result), "\n  CPU/s:", cpu, flush=True)
                except Exception as exc:  # noqa: BLE001 — reported, the other runs go on
                    result = f"failed: {type(exc).__name__}: {exc}"
                    print(result, flush=True)
                http.append(result)
                write_report(out, args, slug, config, workload, offline, http, notes)
            after = server.metrics()
            notes.append(
                f"- server: {after['hf2paged_engine_steps_total'] - before['hf2paged_engine_steps_total']:.0f} "
                f"engine steps and {after['hf2paged_num_preemptions_total'] - before['hf2paged_num_preemptions_total']:.0f} "
                f"preemptions over the HTTP runs; KV blocks free after them "
                f"{after['hf2paged_kv_cache_free_blocks']:.0f} of {after['hf2paged_kv_cache_blocks']:.0f}."
            )
        finally:
            server.stop()
        for i in range(1, args.repeats):
            offline.append(run_system(f"offline-{i}", "ours", 1, args, model_dir, Path(tmp)))
            write_report(out, args, slug, config, workload, offline, http, notes)
        write_report(out, args, slug, config, workload, offline, http, notes)
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
