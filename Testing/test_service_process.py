"""`minigpt-pancreas serve` as a real process (issue 8), started without --model, so with the bundled demo model:
its resident memory stays within the volume budget over repeated uploads and sweeps, SIGTERM answers every
waiting client and the process exits, the access log never shows a query string, and bad limits stop it at once.
"""

from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from backend import cli
from live_server import ServeProcess
from SlicerMiniGPTPancreas import protocol as p

pytestmark = pytest.mark.slow

REFER = "[refer] give me the location of the pancreas"
MIB = 1 << 20
EXIT_BOUND_S = 60.0  # a generous bound on the exit after SIGTERM: a hang, not a speed, fails the test


def _slice(side: int = 512) -> np.ndarray:
    return np.random.default_rng(side).normal(40, 30, (side, side)).round().astype(np.int16)


def test_resident_memory_stays_within_the_volume_budget_over_uploads_and_sweeps():
    budget_mib, volume_mib, rounds = 64, 40, 5
    with ServeProcess("--volume-memory", str(budget_mib / 1024)) as server, server.client() as client:
        client.query_slice(_slice(), REFER, (1.0, 1.0))  # the engine's own first-call allocations
        before = server.resident_bytes()
        for seed in range(rounds):
            volume = np.full((volume_mib * MIB // (2 * 512 * 512), 512, 512), seed, np.int16)
            volume_id = client.upload_volume(volume, (1.0, 1.0, 1.0)).volume_id
            job = client.start_sweep(volume_id, REFER, slice_start=0, slice_stop=1)
            status = client.sweep_status(job.job_id)
            while not status.finished:
                time.sleep(0.05)
                status = client.sweep_status(job.job_id)
            assert status.state == "done" and status.done == 1
        growth_mib = (server.resident_bytes() - before) / MIB
    # Before: every finished sweep kept its 40 MiB volume (200 MiB here). Now: the budget, plus some slack for
    # the allocator and the sweeps' own answers.
    assert growth_mib <= budget_mib + 32, f"resident memory grew {growth_mib:.0f} MiB"


def test_sigterm_answers_every_waiting_client_and_exits():
    clients = 48  # more queries than the model answers within the default grace period (5 s)
    with ServeProcess("--max-queue", str(clients)) as server:
        body = p.SliceQueryRequest(REFER, _slice(), (1.0, 1.0)).to_dict()

        def ask(_: int) -> tuple[int, str]:
            response = requests.post(server.url + p.ROUTE_QUERY, json=body, timeout=EXIT_BOUND_S)
            return response.status_code, response.text

        with ThreadPoolExecutor(clients) as pool:
            answers = pool.map(ask, range(clients))
            while not requests.get(server.url + p.ROUTE_HEALTH, timeout=10).json()["busy"]:
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(EXIT_BOUND_S) is not None
            answers = list(answers)  # a client left without an answer would raise here
    for status, text in answers:
        assert status == 200 or (status == 503 and "shutting down" in text), (status, text[:200])
    assert "Cancel" not in server.output()  # uvicorn never had to cut a request off


def test_the_access_log_never_shows_a_query_string():
    with ServeProcess("--log-level", "info") as server:
        assert requests.get(server.url + p.ROUTE_HEALTH + "?token=secret-in-the-query", timeout=10).ok
    log = server.output()
    assert "GET /healthz HTTP/1.1" in log and "secret-in-the-query" not in log


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--max-queue", "0", "must be at least 1, got 0"),
    ("--max-connections", "many", "'many' is not a whole number"),
    ("--keep-alive", "0", "must be from 0.1 to 86400, got 0"),
    ("--keep-alive", "inf", "must be from 0.1 to 86400, got inf"),
    ("--grace", "nan", "must be from 0 to 86400, got nan"),
    ("--volume-memory", "nan", "must be from 0.0009765625 to 1048576, got nan"),
    ("--volume-memory", "inf", "must be from 0.0009765625 to 1048576, got inf"),  # was an OverflowError
    ("--volume-memory", "1e308", "must be from 0.0009765625 to 1048576, got 1e308"),
])
def test_serve_refuses_bad_limits_before_it_starts(option, value, words, capsys):
    with socket.socket() as taken, pytest.raises(SystemExit) as refused:  # by argparse, with the usage line
        taken.bind(("127.0.0.1", 0))  # a limit let through would stop at the port, not serve on
        taken.listen()
        cli.main(["serve", option, value, "--device", "cpu", "--port", str(taken.getsockname()[1])])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"minigpt-pancreas serve: error: argument {option}: {words}"
