"""One-line, human-readable summaries of answers, sweeps and server health for the module's status label."""

from __future__ import annotations

from collections.abc import Mapping

from SlicerMiniGPTPancreas import protocol as p


def describe_health(health: p.Health, base_url: str) -> str:
    """'Connected to ...: model X on cuda (API 1.0)', or why the server cannot answer yet."""
    if health.status == "loading":
        return f"The server at {base_url} is running; its model is still loading. Try again in a moment."
    busy = ", busy with other work" if health.busy else ""
    return f"Connected to {base_url}: model {health.model_id} on {health.device} (API {health.api_version}){busy}."


def describe_info(info: p.ModelInfo, base_url: str) -> str:
    """Which model answers, where, whether it is the synthetic demo model, and its tasks."""
    synthetic = " (a demonstration model trained on synthetic CT only: not for patients)" if info.synthetic else ""
    offers = (f"tasks: {'; '.join(task.title for task in info.tasks)}" if info.tasks
              else f"{len(info.example_prompts)} suggested questions")
    return (f"Model {info.model_id}{synthetic} on {info.device} at {base_url}; {offers}; uploads up to "
            f"{info.max_upload_bytes / 2**20:.0f} MiB.")


def describe_response(response: p.QueryResponse, slice_index: int) -> str:
    """What the model said about one slice: the yes/no with P(yes), the boxes found, or why nothing was read."""
    where = f"on slice {slice_index}"
    if response.kind == "yes_no":
        answer = "Yes" if response.yes else "No"
        probability = "" if response.yes_probability is None else f" (P(yes) = {response.yes_probability:.2f})"
        return f"{answer}{probability} {where}."
    if response.kind == "boxes":
        count = len(response.boxes)
        if count == 0:
            return f"Nothing found {where}" + (f": {response.reason}" if response.reason else ".")
        return f"Found {count} box{'es' if count > 1 else ''} {where}."
    if response.kind == "text":
        return f"The model answered {where}: {response.answer!r}"
    return f"The answer {where} could not be read ({response.reason or 'invalid'}): {response.answer!r}"


def describe_sweep(state: str, done: int, total: int, responses: Mapping[int, p.QueryResponse],
                   message: str | None = None, resampled: bool = False) -> str:
    """'Boxes on 12 of 40 slices.' / 'Yes on 3 of 40 slices (highest P(yes) 0.91 on slice 42).' plus the state, and
    for a tilted volume the server resampled, that its slices and boxes are on the resampled grid."""
    grid = (" The server resampled the tilted volume onto the nearest axial grid: slices and boxes are on that grid."
            if resampled else "")
    return _describe_answers(state, done, total, responses, message) + grid


def _describe_answers(state: str, done: int, total: int, responses: Mapping[int, p.QueryResponse],
                      message: str | None) -> str:
    yes_no = {s: r for s, r in responses.items() if r.kind == "yes_no"}
    if yes_no:
        yes_slices = [s for s, r in yes_no.items() if r.yes]
        text = f"Yes on {len(yes_slices)} of {len(responses)} slices"
        probabilities = {s: r.yes_probability for s, r in yes_no.items() if r.yes_probability is not None}
        if probabilities:
            best = max(probabilities, key=probabilities.__getitem__)
            text += f" (highest P(yes) {probabilities[best]:.2f} on slice {best})"
    else:
        with_boxes = sum(1 for r in responses.values() if r.boxes)
        invalid = sum(1 for r in responses.values() if r.kind == "invalid")
        text = f"Boxes on {with_boxes} of {len(responses)} slices"
        if invalid:
            text += f"; {invalid} answers could not be read"
    if state == "done":
        return text + "."
    reason = f": {message}" if message and state == "failed" else ""  # a cancel message only repeats the counts
    return f"Sweep {state} after {done} of {total} slices{reason}. {text}."
