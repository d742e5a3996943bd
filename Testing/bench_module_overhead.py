"""What a single-slice question costs the Slicer module over the server's own time (issue 10: at most 50 ms), against
`minigpt-pancreas serve` run as a real process with the bundled demo model, on real MRML nodes (slicer-core).

Each question takes the panel's path: the Widget's Apply (`_connectLogic` -> `logic.set_server`, then
`logic.prepare_slice` of a 512 x 512 CT slice), the question in a TaskRunner thread (`logic.query_slice`), and the
runner drained every DRAIN_INTERVAL_MS as the Widget's QTimer does. The server reports its own time in the answer
(`queue_ms` waiting for the model + `inference_ms` in the engine); the overhead of a question is

  total  from the task's start until the answer reaches the GUI thread, minus queue_ms + inference_ms
  http   the client call alone (encoding, HTTP on loopback, the server's body parsing and reply, decoding), minus
         queue_ms + inference_ms
  drain  from the end of the client call until the GUI thread's timer hands the answer over

Run from the repository root: nice -n 15 .venv/bin/python Testing/bench_module_overhead.py [--queries N]

Figures, ms over the server's time (30 questions per run; 2 CPU cores shared with a training run at nice 0 and other
test suites, load average 3 to 6; runs alternated; before = commit 3f4a824: a new client and connection on every
Apply, a 20 ms timer; after: the client kept while the settings are unchanged, a 5 ms timer):
  nice 15   before  total median 41.1 / 38.4 / 31.4, max 395.0 / 302.6 /  89.9; drain median 6.1 / 13.3 / 14.5
            after   total median 33.4 / 39.7 / 22.8, max 390.8 / 200.2 / 158.7; drain median 2.8 /  2.7 /  2.1
  nice 0    before  total median 48.8, max 174.0;  after  total median 40.3, max 106.8
With the machine to itself (load average 1.4; after): total median 13.1, p90 16.3, max 20.9; http median 10.7,
max 16.4; drain median 2.5, max 4.8.
The drain went from up to 26 ms to up to 15 ms (one stall of 44). The kept connection saves about 1 ms (30
alternated pairs: http median 13.3 kept, 14.5 new). The rest is `http`, and its tails are waiting for a CPU: the
same call costs 9-15 ms at quieter moments, about 5 ms of it the server's HTTP handling (body, JSON, thread
hand-overs). Parsing the body on the server's event loop instead of in its thread pool gave http median 19.6
against 26.7 in one alternated run of 20, tails unchanged (a server change, not made here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "MiniGPTPancreasModule"))
import slicer  # noqa: E402  (the slicer-core wheel)
from live_server import ServeProcess  # noqa: E402

from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic  # noqa: E402
from MiniGPTPancreasLib.volume_geometry import add_volume_node  # noqa: E402
from MiniGPTPancreasLib.worker import DRAIN_INTERVAL_MS, TaskRunner  # noqa: E402
from SlicerMiniGPTPancreas.phantom import make_phantom  # noqa: E402

REFER = "[refer] give me the location of the pancreas"


def ask_like_the_panel(logic: MiniGPTPancreasLogic, url: str, ct, slice_index: int) -> dict[str, float]:
    """One Apply of the panel; the three overheads of the docstring in ms."""
    logic.set_server(url)  # what the Widget's _connectLogic does on every Apply
    request = logic.prepare_slice(ct, slice_index)
    marks: dict[str, float] = {}

    def work(report, cancelled):
        response = logic.query_slice(request, REFER)
        marks["answered"] = time.perf_counter()
        return response

    answers = []
    runner = TaskRunner()
    marks["start"] = time.perf_counter()
    runner.start(work, answers.append)
    while runner.busy:  # the Widget's QTimer
        time.sleep(DRAIN_INTERVAL_MS / 1000)
        runner.poll()
    handed_over = time.perf_counter()
    server_ms = answers[0].queue_ms + answers[0].inference_ms
    return {"total": (handed_over - marks["start"]) * 1000 - server_ms,
            "http": (marks["answered"] - marks["start"]) * 1000 - server_ms,
            "drain": (handed_over - marks["answered"]) * 1000}


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):5.1f}  p90 {p90:5.1f}  max {ordered[-1]:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    scene = slicer.vtkMRMLScene()
    phantom = make_phantom(0, spacing=(288 / 512, 288 / 512, 5.0))  # 512 x 512 slices, as CT has
    ct = add_volume_node(scene, phantom.hu, phantom.ijk_to_ras, "CT")
    with ServeProcess() as server:
        logic = MiniGPTPancreasLogic()
        ask_like_the_panel(logic, server.url, ct, 0)  # the engine's first-call allocations
        rows = [ask_like_the_panel(logic, server.url, ct, s % 40) for s in range(args.queries)]
        logic.client.close()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{args.queries} questions, 512 x 512 slices, drain timer {DRAIN_INTERVAL_MS} ms, load average {load}; "
          "ms over the server's queue_ms + inference_ms:")
    for name in ("total", "http", "drain"):
        print(f"  {name:5s}  {summary([row[name] for row in rows])}")


if __name__ == "__main__":
    main()
