"""Figures for the service under hostile input, load and shutdown (issue 8), against `minigpt-pancreas serve` run as
a real process with the bundled demo model:

  memory   resident-memory growth of the server over repeated 40 MiB upload + 1-slice sweep, --volume-memory 64 MiB
  hostile  how many of the item-3 inputs (deep JSON, huge integers, enormous version header, lone surrogate, tiny
           temperature, long echoed ids and paths) get a 5xx, and how many error messages exceed 1000 characters
  sigterm  SIGTERM while queries wait: how many clients got no HTTP answer, and how long the process took to exit

Run from the repository root: nice -n 15 .venv/bin/python Testing/bench_service.py [memory] [hostile] [sigterm]

Figures (2 CPU cores shared with a training run, bundled demo model; before = commit 007ff99, after = issue 8):
  memory   grew 216 MiB before (every finished sweep kept its volume), 40 MiB after (one volume in the budget)
  hostile  8 of 12 inputs answered 500 and 3 messages echoed 4301 characters or spoke of the error envelope
           before; 0 and 0 after
  sigterm  33 of 48 clients dropped without an answer before (exit 5.7 s after SIGTERM); 0 after (200 or 503
           "shutting down", exit 5.2 s after SIGTERM)
"""

from __future__ import annotations

import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from live_server import ServeProcess  # noqa: E402

from SlicerMiniGPTPancreas import protocol as p  # noqa: E402

REFER = "[refer] give me the location of the pancreas"
MIB = 1 << 20


def _slice(side: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 30, (side, side)).round().astype(np.int16)


def memory(rounds: int = 5) -> None:
    with ServeProcess("--volume-memory", str(64 / 1024)) as server, server.client() as client:
        client.query_slice(_slice(), REFER, (1.0, 1.0))  # the engine's first-call allocations
        before = server.resident_bytes()
        for seed in range(rounds):
            volume = np.full((80, 512, 512), seed, np.int16)  # 40 MiB
            volume_id = client.upload_volume(volume, (1.0, 1.0, 1.0)).volume_id
            job = client.start_sweep(volume_id, REFER, slice_start=0, slice_stop=1)
            while not client.sweep_status(job.job_id).finished:
                time.sleep(0.1)
            del volume
        growth = (server.resident_bytes() - before) / MIB
    print(f"memory: {rounds} x (40 MiB upload + 1-slice sweep) with a 64 MiB volume budget: resident memory grew "
          f"{growth:.0f} MiB")


def _hostile_requests(url: str) -> list[tuple[str, str, str, dict, bytes]]:
    """(name, method, url, headers, body) of each item-3 input."""
    good = p.SliceQueryRequest(REFER, _slice(16), (1.0, 1.0)).to_dict()
    as_json = {"Content-Type": "application/json"}

    def query(**changes) -> bytes:
        return json.dumps({**good, **changes}).encode()

    chat = {"messages": [{"role": "user", "text": "hi"}], "slice_hu": good["slice_hu"], "pixel_spacing_mm": [1, 1]}
    return [
        ("deep JSON", "POST", url + p.ROUTE_QUERY, as_json, b"[" * 100_000 + b"]" * 100_000),
        ("deep JSON in a field", "POST", url + p.ROUTE_QUERY, as_json,
         query()[:-1] + b', "slice_index": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("huge integer", "POST", url + p.ROUTE_QUERY, as_json, query()[:-1] + b', "slice_index": 1' + b"0" * 5000
         + b"}"),
        ("long integer", "POST", url + p.ROUTE_QUERY, as_json, query()[:-1] + b', "slice_index": 1' + b"0" * 4000
         + b"}"),
        ("enormous API version", "GET", url + p.ROUTE_INFO, {p.API_VERSION_HEADER: "1" * 5000 + ".0"}, b""),
        ("lone surrogate in a prompt", "POST", url + p.ROUTE_QUERY, as_json,
         query(prompt="[refer] where is \ud800 the pancreas")),
        ("lone surrogate in a chat", "POST", url + p.ROUTE_CHAT, as_json,
         json.dumps({**chat, "messages": [{"role": "user", "text": "\udfff"}]}).encode()),
        ("tiny temperature", "POST", url + p.ROUTE_CHAT, as_json,
         json.dumps({**chat, "options": {"temperature": 1e-300}}).encode()),
        ("long job id", "GET", url + p.API_PREFIX + "/sweeps/" + "j" * 20_000, {}, b""),
        ("long path", "GET", url + p.API_PREFIX + "/" + "x" * 20_000, {}, b""),
        ("long volume id", "POST", url + p.ROUTE_SWEEPS, as_json,
         json.dumps({"volume_id": "v" * 20_000, "prompt": REFER}).encode()),
        ("long shape", "POST", url + p.ROUTE_VOLUMES + "?dtype=int16&spacing_mm=1,1,1&shape=" + "9" * 20_000,
         {"Content-Type": "application/octet-stream"}, b"\0\0"),
    ]


def hostile() -> None:
    with ServeProcess() as server:
        failures, long_messages = [], []
        for name, method, url, headers, body in _hostile_requests(server.url):
            response = requests.request(method, url, headers=headers, data=body, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{name}: {response.status_code}")
            if len(response.text) > 1000 or "ErrorResponse" in response.text:  # too long, or about the envelope
                long_messages.append(f"{name}: {len(response.text)} characters")
            print(f"  {name}: {response.status_code} {response.text[:160]}")
        total = len(_hostile_requests(server.url))
    print(f"hostile: {len(failures)} of {total} inputs got a 5xx {failures}; {len(long_messages)} answers over 1000 "
          f"characters or about the error envelope instead of the input {long_messages}")


def sigterm(clients: int = 48) -> None:
    """More chat turns at once than the model answers within the grace period."""
    with ServeProcess("--max-queue", str(clients)) as server:
        body = p.ChatRequest((p.ChatMessage("user", "describe this slice"),), _slice(64), (1.0, 1.0),
                             options=p.AnswerOptions(max_new_tokens=p.MAX_NEW_TOKENS_LIMIT, temperature=1.0)).to_dict()

        def ask(_: int) -> str:
            try:
                return str(requests.post(server.url + p.ROUTE_CHAT, json=body, timeout=120).status_code)
            except requests.RequestException as error:
                return f"dropped ({type(error).__name__})"

        with ThreadPoolExecutor(clients) as pool:
            answers = pool.map(ask, range(clients))
            while not requests.get(server.url + p.ROUTE_HEALTH, timeout=10).json()["busy"]:
                time.sleep(0.05)
            time.sleep(1.0)  # let every request reach the queue
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(120)
            exit_s = time.monotonic() - started
            answers = list(answers)
    dropped = sum(answer.startswith("dropped") for answer in answers)
    print(f"sigterm: {clients} chat turns in flight; {dropped} dropped without an HTTP answer; answers "
          f"{sorted(set(answers))}; the process exited {exit_s:.1f} s after SIGTERM (grace 5 s)")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["memory", "hostile", "sigterm"]:
        {"memory": memory, "hostile": hostile, "sigterm": sigterm}[name]()
