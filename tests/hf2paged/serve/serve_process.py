"""A real `hf2paged serve` process for tests (and its metrics, read back)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from engine_models import build_model_dir
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[3]
# A chat template within the character tokenizer's alphabet (no newlines).
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_chat_model(root: Path) -> Path:
    """The engine tests' tiny random Llama, with a chat template."""
    from transformers import AutoTokenizer

    model_dir, _ = build_model_dir("llama", root)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


class ServerProcess:
    """`hf2paged serve MODEL --port 0 ...` (as `python -m hf2paged.cli`, this checkout's
    code), ready once it prints its URL."""

    def __init__(self, model: Path, *args: str, timeout: float = 300) -> None:
        cmd = [sys.executable, "-m", "hf2paged.cli", "serve", str(model), "--port", "0"]
        cmd += ["--log-level", "warning", *args]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        ready: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        try:
            self.url = ready.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError(
                f"the server did not start in {timeout:.0f} s:\n{self.output}"
            ) from None
        if not self.url:
            raise RuntimeError(f"the server exited ({self.proc.wait()}):\n{self.output}")
        self.base_url = f"{self.url}/v1"

    def _read(self, ready: queue.Queue) -> None:
        marker = "hf2paged serve: ready at "
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(marker):
                ready.put(line[len(marker) :].strip())
        ready.put("")  # exited

    def descendants(self) -> dict[int, str]:
        """pid -> command line of every live process below the server (the engine
        process, multiprocessing's resource tracker, TP ranks)."""
        return descendants(self.proc.pid)

    def engine_pid(self) -> int:
        """The engine process (multiprocessing's spawned child of the server)."""
        (pid,) = [
            pid for pid, cmd in self.descendants().items()
            if "spawn_main" in cmd and _parent(pid) == self.proc.pid
        ]  # fmt: skip
        return pid

    @property
    def output(self) -> str:
        return "".join(self.lines[-60:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: ``name`` or ``name{label=value,...}`` -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return values

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """The metrics once no request runs or waits and every KV block is free again;
        AssertionError naming what is still held after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (
                m["hf2paged_num_requests_running"] == 0
                and m["hf2paged_num_requests_waiting"] == 0
                and m["hf2paged_kv_cache_free_blocks"] == m["hf2paged_kv_cache_blocks"]
            )
            if idle:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not idle after {timeout} s: running "
                    f"{m['hf2paged_num_requests_running']}, waiting "
                    f"{m['hf2paged_num_requests_waiting']}, free blocks "
                    f"{m['hf2paged_kv_cache_free_blocks']} of {m['hf2paged_kv_cache_blocks']}"
                )
            time.sleep(0.05)


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# ---------------------------------------------------------------------- processes (Linux /proc)
def _parent(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else int(stat[1])


def _stat(pid: int) -> list[str] | None:
    """State and the fields after it of /proc/PID/stat; None for a process that is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found[pid] = cmd
            todo.append(pid)
    return found


def wait_gone(pids, timeout: float = 30) -> None:
    """Wait until none of `pids` lives (zombies count as gone: they have exited);
    AssertionError naming those left after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] != "Z"]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes left behind after {timeout} s: {left}")
        time.sleep(0.1)
