"""The `prepare` run: discover, prepare volumes in parallel, then number, split, cut task sets and summarise.

Output folder layout (OUT):
    OUT/<dataset>/slices/<volume>_slice_<s>.png   model-view slices (volume_job.py)
    OUT/<dataset>/volumes/<volume>.json           per-volume metadata and fingerprints
    OUT/<dataset>/records/<volume>.json           per-volume list of slice records (the resume marker)
    OUT/<dataset>/<NIH|MSD|ABD>_slices_info.json  all of a dataset's records in one list, as upstream's file
    OUT/splits.json                               the one split shared by every task (splits.py); neither it nor
                                                  a task set is written if a test slice's content is trained on
    OUT/tasks/<task>_{train,test}.json            task sets (tasks.py); also <task>_val.json with val_ratio > 0
    OUT/summary.json, OUT/problems.json           the Table-1-style summary; what could not be prepared
The numbering, split, task and summary steps always run over EVERY volume finished in OUT, not only this
run's, so datasets may be prepared one at a time into the same OUT. `slice_id` is upstream's 1-based counter
over a dataset's slices in volume-name order; it changes when volumes are added, (volume, slice_index) does not.
Input folders are only read: OUT may not lie inside a dataset root, nor a root inside OUT.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from training.prepare.discovery import Discovery, VolumeSource, discover
from training.prepare.files import (DATASETS, PrepareError, Problem, atomic_write_json, is_within, read_json,
                                    writing)
from training.prepare.splits import (DUPLICATE_POLICIES, leaked_slices, make_splits, moved_volumes, split_names,
                                     split_of)
from training.prepare.summary import DEFAULT_THRESHOLDS, SliceCounter, format_shortcuts, format_table
from training.prepare.matching import shortcut_aucs
from training.prepare.tasks import TC, TaskBuilder, write_tasks
from training.prepare.volume_job import (INTENSITIES, LABEL_GEOMETRIES, VolumeOutcome, VolumeSettings, is_finished,
                                         meta_path, prepare_volume, records_path)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class PrepareOptions:
    roots: dict[str, str]  # dataset name -> root folder
    out: str
    settings: VolumeSettings = field(default_factory=VolumeSettings)
    threshold: float = 0.6
    test_threshold: float | None = None  # the test files' own threshold; None: the same as `threshold`
    test_ratio: float = 0.2
    val_ratio: float = 0.0  # held-out TRAINING volumes for picking epochs; 0 writes no val split at all
    seed: int = 42
    duplicates: str = "same-split"
    organ_balance: bool = True
    summary_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    workers: int = field(default_factory=default_workers)
    progress: bool = False
    force: bool = False


@dataclass
class PrepareReport:
    outcomes: list[VolumeOutcome]
    problems: list[Problem]
    notes: list[str]
    summary: dict[str, Any]


def run_prepare(options: PrepareOptions, echo: Callable[[str], None] = print) -> PrepareReport:
    """Run everything; raise `PrepareError` for bad options, report bad volumes and go on."""
    _check_options(options)
    out = Path(options.out).expanduser()
    discoveries = [discover(dataset, root) for dataset, root in sorted(options.roots.items(),
                                                                       key=lambda item: DATASETS.index(item[0]))]
    with writing(out):  # an OSError becomes an OutputError naming the folder
        out.mkdir(parents=True, exist_ok=True)
    notes = [f"{d.dataset}: {note}" for d in discoveries for note in d.notes]
    for note in notes:
        echo(f"note: {note}")
    outcomes = _prepare_volumes(discoveries, out, options, echo)
    problems = [p for d in discoveries for p in d.problems] + [o.problem for o in outcomes if o.problem]
    summary = _finalise(out, options, echo, notes)
    summary["run"] = {status: sum(o.status == status for o in outcomes) for status in ("prepared", "resumed", "failed")}
    summary["problems"] = [p.to_json() for p in problems]
    atomic_write_json(out / "problems.json", summary["problems"])
    atomic_write_json(out / "summary.json", summary)
    echo(format_table(summary["table"], options.summary_thresholds, summary["tasks"]))
    if summary["shortcuts"]:
        echo(format_shortcuts(summary["shortcuts"]))
    run = summary["run"]
    echo(f"\n{run['prepared']} volumes prepared, {run['resumed']} already done, {run['failed']} failed; "
         f"output in {out}")
    if problems:
        echo(f"{len(problems)} problems (also in {out / 'problems.json'}):")
        for problem in problems:
            echo(f"  {problem.line()}")
    return PrepareReport(outcomes, problems, notes, summary)


def _check_options(options: PrepareOptions) -> None:
    if not options.roots:
        raise PrepareError("No dataset to prepare: give --dataset and --root, or --all with a config.")
    unknown = sorted(set(options.roots) - set(DATASETS))
    if unknown:
        raise PrepareError(f"Unknown dataset(s) {', '.join(unknown)}; use {', '.join(DATASETS)}.")
    checks = [
        (0.0 <= options.threshold < 1.0, f"--threshold must be in [0, 1), got {options.threshold}"),
        (options.test_threshold is None or 0.0 <= options.test_threshold < 1.0,
         f"--test-threshold must be in [0, 1), got {options.test_threshold}"),
        (0.0 <= options.test_ratio < 1.0, f"--test-ratio must be in [0, 1), got {options.test_ratio}"),
        (options.val_ratio >= 0.0 and options.test_ratio + options.val_ratio < 1.0,
         f"--val-ratio must be >= 0 and leave volumes to train on (--test-ratio + --val-ratio < 1), got "
         f"{options.val_ratio} with --test-ratio {options.test_ratio}"),
        (options.workers >= 1, f"--workers must be at least 1, got {options.workers}"),
        (options.duplicates in DUPLICATE_POLICIES, f"--duplicates must be one of {DUPLICATE_POLICIES}"),
        (options.settings.intensity in INTENSITIES, f"--intensity must be one of {INTENSITIES}"),
        (options.settings.label_geometry in LABEL_GEOMETRIES, f"--label-geometry must be one of {LABEL_GEOMETRIES}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PrepareError(message + ".")
    for dataset, root in options.roots.items():
        if Path(root).exists() and (is_within(options.out, root) or is_within(root, options.out)):
            raise PrepareError(f"--out {options.out} and the {dataset} root {root} overlap; prepare never writes "
                               "inside a dataset folder: choose an output folder outside it.")


def _prepare_volumes(discoveries: list[Discovery], out: Path, options: PrepareOptions,
                     echo: Callable[[str], None]) -> list[VolumeOutcome]:
    """Prepare every discovered volume (finished ones are skipped), in worker processes when asked."""
    from tqdm import tqdm

    todo, outcomes = [], []
    for source in (s for d in discoveries for s in d.sources):
        if options.force or not is_finished(out, source, options.settings):
            todo.append(source)
        else:
            outcomes.append(VolumeOutcome(source.dataset, source.volume, "resumed"))
    if outcomes:
        echo(f"{len(outcomes)} volumes already prepared with these settings are skipped (--force redoes them).")
    with tqdm(total=len(todo), desc="volumes", unit="vol", disable=not options.progress) as bar:
        for outcome in _outcomes(todo, out, options, echo):
            if outcome.problem:
                bar.write(f"failed: {outcome.problem.line()}")
            outcomes.append(outcome)
            bar.update()
    return outcomes


def _outcomes(todo: list[VolumeSource], out: Path, options: PrepareOptions, echo: Callable[[str], None]):
    """Yield one outcome per volume as it finishes: in worker processes when asked, else in this one.

    If the pool breaks (a worker killed, e.g. for memory, or workers that cannot start because the calling
    script cannot be re-imported), the volumes it did not finish are prepared here, one at a time.
    """
    unfinished = list(todo)
    if options.workers > 1 and len(todo) > 1:
        # spawn, not fork: the parent may already run ITK threads, which a forked child would inherit half-locked.
        with ProcessPoolExecutor(max_workers=min(options.workers, len(todo)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(prepare_volume, source, str(out), options.settings): source
                       for source in todo}
            try:
                for future in as_completed(futures):
                    outcome = future.result()
                    unfinished.remove(futures[future])
                    yield outcome
            except BrokenProcessPool as error:
                echo(f"warning: the worker processes stopped ({error}); preparing the {len(unfinished)} remaining "
                     "volumes in this process, one at a time.")
    for source in unfinished:
        yield prepare_volume(source, str(out), options.settings)


def _finished_metas(out: Path, echo: Callable[[str], None], settings: VolumeSettings) -> list[dict[str, Any]]:
    """Metadata of every finished volume in OUT, in dataset then name order."""
    metas, other_settings = [], []
    for dataset in DATASETS:
        folder = out / dataset / "records"
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            meta_file = meta_path(out, dataset, path.stem)
            if path.name.startswith(".") or not meta_file.is_file():  # a temporary file, or an orphan
                continue
            try:
                meta = read_json(meta_file)
            except (OSError, ValueError) as error:
                echo(f"warning: {meta_file} is unreadable ({error}); {dataset}/{path.stem} is left out until "
                     "its dataset is prepared again.")
                continue
            metas.append(meta)
            if meta.get("settings") != asdict(settings):
                other_settings.append(f"{dataset}/{path.stem}")
    if other_settings:
        echo(f"warning: {len(other_settings)} volumes in {out} were prepared with other settings "
             f"({', '.join(other_settings[:3])}...); rerun their datasets with these settings or use another --out.")
    return metas


def _finalise(out: Path, options: PrepareOptions, echo: Callable[[str], None], notes: list[str]) -> dict[str, Any]:
    """Number slices, split, build tasks and count, over every finished volume in OUT."""
    from tqdm import tqdm

    metas = _finished_metas(out, echo, options.settings)
    document = make_splits(metas, options.seed, options.test_ratio, options.duplicates, options.val_ratio)
    splits_file = out / "splits.json"
    if splits_file.is_file():
        moved = moved_volumes(read_json(splits_file), document)
        if moved:
            echo(f"warning: {len(moved)} volumes changed split since the last run ({', '.join(moved[:3])}...): "
                 "models trained on the old split must not be validated or evaluated on the new one.")
    split = split_of(document)
    builder = TaskBuilder(options.threshold, options.seed, options.organ_balance, split_names(options.val_ratio),
                          options.test_threshold)
    counter = SliceCounter(options.summary_thresholds)
    next_id = {dataset: 1 for dataset in DATASETS}
    slices_info: dict[str, list[dict[str, Any]]] = {dataset: [] for dataset in DATASETS}
    for meta in tqdm(metas, desc="tasks", unit="vol", disable=not options.progress):
        dataset, volume = meta["dataset"], meta["volume"]
        records = _numbered_records(out, dataset, volume, next_id[dataset])
        next_id[dataset] += len(records)
        slices_info[dataset].extend(records)
        if (dataset, volume) in split:
            builder.add_volume(dataset, volume, split[(dataset, volume)], records)
            counter.add_volume(dataset, split[(dataset, volume)], records)
    tasks = builder.finish()
    _refuse_leaks(metas, tasks)
    atomic_write_json(splits_file, document, only_if_changed=True)
    task_counts = write_tasks(out, tasks)
    for dataset, records in slices_info.items():
        if records:  # upstream's *_slices_info.json: every slice of every volume, for tools that expect it
            atomic_write_json(out / dataset / f"{records[0]['dataset']}_slices_info.json", records,
                              only_if_changed=True)
    # how well pancreas size or level alone would answer the tumour yes/no question (0.5: not at all)
    shortcuts = {TC: {split: {"tolerances": builder.tc_tolerances.get(split), "auc": shortcut_aucs(entries)}
                      for split, entries in tasks[TC].items()}} if TC in tasks else {}
    return {"options": _options_json(options), "table": counter.table(), "tasks": task_counts, "shortcuts": shortcuts,
            "duplicate_groups": document["duplicate_groups"], "dropped": document["dropped"], "notes": notes}


def _refuse_leaks(metas: list[dict[str, Any]], tasks: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Stop before writing any split or task file if a test slice's content is also trained on."""
    leaks = leaked_slices(metas, tasks)
    if leaks:
        raise PrepareError(
            f"{len(leaks)} test slices have the same content as training slices, e.g. {'; '.join(leaks[:3])}. "
            "These volumes share slices but too few to be grouped as one scan: remove one of the copies from its "
            "dataset folder and run prepare again.")


def _numbered_records(out: Path, dataset: str, volume: str, first_id: int) -> list[dict[str, Any]]:
    """A volume's records with `slice_id` = first_id, first_id + 1, ...; rewritten only if that changed them."""
    path = records_path(out, dataset, volume)
    records = read_json(path)
    if any(record["slice_id"] != first_id + s for s, record in enumerate(records)):
        for s, record in enumerate(records):
            record["slice_id"] = first_id + s
        atomic_write_json(path, records)
    return records


def _options_json(options: PrepareOptions) -> dict[str, Any]:
    # val_ratio and test_threshold only when used, so that a run without them writes the summary it always did
    val = {"val_ratio": options.val_ratio} if options.val_ratio > 0 else {}
    test = {} if options.test_threshold is None else {"test_threshold": options.test_threshold}
    return {"roots": options.roots, "out": options.out, **asdict(options.settings), "threshold": options.threshold,
            **test, "test_ratio": options.test_ratio, **val, "seed": options.seed, "duplicates": options.duplicates,
            "organ_balance": options.organ_balance, "summary_thresholds": list(options.summary_thresholds)}
