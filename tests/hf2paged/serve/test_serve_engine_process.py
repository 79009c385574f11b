"""The engine steps in a process of its own (`EngineProcess`): when that process dies,
requests in flight end with an error and new ones get a 503 naming how it died (one line;
/health says the same); the server leaves no process behind, whether it is stopped with
Ctrl-C while streams run or killed outright."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest
from conftest import ENGINE, KV_MIB
from serve_process import ServerProcess, wait_gone

ARGS = ["--kv-cache-memory-mib", str(KV_MIB), "--block-size", str(ENGINE["block_size"])]
STREAM = {"prompt": "ab", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture
def served(tiny_model):
    with ServerProcess(tiny_model, *ARGS) as proc:
        yield proc


def test_engine_death_is_a_503_in_one_line(served) -> None:
    below = served.descendants()
    engine = served.engine_pid()
    url = f"{served.base_url}/completions"
    with httpx.Client(timeout=60) as http:
        # A request in flight when the engine dies (stopped first, so it cannot finish).
        os.kill(engine, signal.SIGSTOP)
        with http.stream("POST", url, json=STREAM) as stream:
            assert stream.status_code == 200
            os.kill(engine, signal.SIGKILL)
            events = [e for e in stream.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert "killed by SIGKILL" in error["message"], error
        # Later requests: 503, one line naming how the engine died; /health agrees.
        r = http.post(url, json=dict(STREAM, stream=False))
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert message == (
            f"the engine is not running: the engine process (pid {engine}) was killed by SIGKILL"
        )
        health = http.get(f"{served.url}/health")
        assert health.status_code == 503 and health.json()["error"]["message"] == message
        assert http.get(f"{served.base_url}/models").status_code == 200  # the server lives on
    # The server said so once, in one line, and still stops cleanly.
    assert sum("killed by SIGKILL" in line for line in served.lines) == 1, served.output
    assert served.stop() in (0, 130, -signal.SIGINT)
    wait_gone(below)


def test_ctrl_c_with_streams_in_flight_leaves_no_process(served) -> None:
    below = served.descendants()
    assert served.engine_pid() in below
    started = threading.Barrier(5)
    card = httpx.get(f"{served.base_url}/models").json()["data"][0]
    long = dict(STREAM, max_tokens=card["max_model_len"] - 2)  # the whole context
    statuses = []

    def client() -> None:
        try:
            with httpx.Client(timeout=60) as http:
                with http.stream("POST", f"{served.base_url}/completions", json=long) as s:
                    statuses.append(s.status_code)
                    lines = s.iter_lines()
                    next(lines)
                    started.wait()
                    for _ in lines:
                        pass
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass  # the server went away: expected

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    assert statuses == [200] * 4
    served.proc.send_signal(signal.SIGINT)
    served.proc.wait(timeout=30)
    wait_gone(below)
    for t in threads:
        t.join(timeout=30)


def test_a_killed_server_leaves_no_process(served) -> None:
    below = served.descendants()
    assert served.engine_pid() in below
    served.proc.kill()
    served.proc.wait()
    wait_gone(below)  # the engine stops when its connection to the server closes
