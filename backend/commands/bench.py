"""`minigpt-pancreas bench`: how much faster the engine answers a volume than upstream's one-question loop.

The same synthetic CT slices and cascade questions go through the engine as a sweep uses it and through a plain
per-slice, per-question, one-`generate` loop (`backend.bench.sweep_vs_plain`). It prints slices per second of each,
the ratio, the time to the first answer of a single query, the peak memory and whether the answers are equal;
`--json` prints the same as one JSON object. `--true-size` instead loads a model of the real size with random
weights (`backend.bench.true_size`; ~16 GB of files, 20 GB of memory, minutes).
"""

from __future__ import annotations

import argparse
import json

from backend.commands.model_options import (ModelSourceError, add_model_arguments, engine_from_args,
                                            resolve_model_source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--slices", type=int, default=32, metavar="N", help="slices of the synthetic CT (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="per answer (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--true-size", action="store_true",
                        help="load EVA ViT-g 448 px + LLaMA-2-7B shapes + LoRA r64 (random weights, original file "
                             "formats) in bfloat16 and answer one slice; needs ~20 GB memory and ~16 GB disk; the "
                             "model options are not used")
    parser.add_argument("--scratch", metavar="DIR", help="with --true-size: where the files go (default: the temp dir)")


def run(args: argparse.Namespace) -> int:
    for option, value in (("--slices", args.slices), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ModelSourceError(f"{option} must be at least 1, got {value}.")
    if args.true_size:
        return _true_size(args)
    from backend.bench.sweep_vs_plain import bench_slices, run_sweep_bench

    resolve_model_source(args, announce=not args.json)  # --json: stdout is the one JSON object
    engine = engine_from_args(args)
    result = run_sweep_bench(engine, bench_slices(args.slices), max_new_tokens=args.max_new_tokens)
    report = {"model": engine.model_id, "device": engine.device, "precision": engine.precision,
              "image_size": engine.image_size, "batch_size": engine.batch_size, **result.to_dict()}
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0


def _text(report: dict) -> str:
    engine, plain = report["engine"], report["plain_loop"]
    equal = "yes" if report["answers_equal_to_plain_loop"] else (
        f"no: {report['answers_differing']} slice(s) differ, {report['differing_plain_well_formed']} of them where "
        "the plain loop's answer is well-formed")
    return "\n".join([
        f"model {report['model']} on {report['device']} ({report['precision']}), {report['image_size']} px, "
        f"{report['slices']} slices, {report['questions']} questions, engine batch {report['batch_size']}",
        f"  engine sweep : {engine['slices_per_second']:8.2f} slices/s  ({engine['seconds']:.2f} s, "
        f"{engine['language_model_calls']} LLM calls, {engine['vision_encodings']} images encoded)",
        f"  plain loop   : {plain['slices_per_second']:8.2f} slices/s  ({plain['seconds']:.2f} s, "
        f"{plain['language_model_calls']} LLM calls, {plain['vision_encodings']} images encoded)",
        f"  speed-up     : {report['speedup_vs_plain_loop']:.2f}x",
        f"  first answer : {report['first_answer_seconds'] * 1000:.0f} ms (one slice, one question)",
        f"  peak memory  : {report['peak_memory_bytes'] / 2**20:.0f} MiB ({report['peak_memory_kind']})",
        f"  answers equal to the plain loop: {equal}",
    ])


def _true_size(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backend.bench.true_size import run_true_size
    from backend.cascade_sweep import PANCREAS_QUESTION

    report = run_true_size(PANCREAS_QUESTION, Path(args.scratch) if args.scratch else None)  # TrueSizeError: 1 line
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"true-size model (random weights, bfloat16, CPU, {report['torch_threads']} threads): {report['vision']}, "
          f"LLaMA {report['llm_layers']} layers, LoRA r {report['lora_r']}")
    print(f"  files {report['files_bytes'] / 1e9:.1f} GB written in {report['write_seconds']:.0f} s; "
          f"loaded in {report['load_seconds']:.0f} s")
    print(f"  weights {report['weights_bytes'] / 1e9:.2f} GB, peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({report['peak_rss_over_weights']:.2f}x the weights)")
    print(f"  one slice answered in {report['seconds_per_answer']:.1f} s: {report['answer']!r}")
    return 0
