"""Time `InferenceEngine.run` on N random HU slices with batch size 1 against larger batches.

    python -m backend.bench.bench_engine                       # a tiny random model of the real code (CPU)
    python -m backend.bench.bench_engine --model-dir MODEL --device cuda --slices 64

Prints seconds per run, milliseconds per slice, the speed-up over batch size 1, and whether the answers are the
same as with batch size 1. A warm-up run comes first, so one-off start-up costs are not counted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "[refer] give me the location of the pancreas"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a model folder; default: a tiny random model")
    parser.add_argument("--slices", type=int, default=32, help="random 512 x 512 HU slices (default 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: per device")
    parser.add_argument("--constrain-boxes", action="store_true", help="force box answers (real token counts)")
    args = parser.parse_args(argv)

    from backend.engine import InferenceEngine

    rng = np.random.default_rng(0)
    slices = [rng.normal(40, 120, (512, 512)).astype(np.int16) for _ in range(args.slices)]
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        engine = _engine(args, Path(scratch))
        print(f"model {engine.model_id}, device {engine.device}, {engine.precision}, image {engine.image_size} px, "
              f"{args.slices} slices, max_new_tokens {args.max_new_tokens}, constrain_boxes {args.constrain_boxes}")
        engine.run(slices[:1], PROMPT, max_new_tokens=args.max_new_tokens)  # warm-up
        timings, baseline = {}, None
        for batch_size in args.batch_sizes:
            engine = InferenceEngine(engine.model, batch_size=batch_size, model_id=engine.model_id,
                                     precision=engine.precision)
            _synchronize(engine.device)
            started = time.perf_counter()
            results = engine.run(slices, PROMPT, max_new_tokens=args.max_new_tokens,
                                 constrain_boxes=args.constrain_boxes)
            _synchronize(engine.device)
            timings[batch_size] = time.perf_counter() - started
            answers = [r.answer for r in results]
            baseline = baseline or answers
            same = sum(a == b for a, b in zip(answers, baseline))
            print(f"batch size {batch_size:3d}: {timings[batch_size]:8.3f} s, "
                  f"{1000 * timings[batch_size] / len(slices):8.1f} ms/slice, "
                  f"answers equal to the first run: {same}/{len(slices)}")
    first = args.batch_sizes[0]
    for batch_size in args.batch_sizes[1:]:
        print(f"speed-up batch {batch_size} over batch {first}: {timings[first] / timings[batch_size]:.2f}x")
    return 0


def _engine(args: argparse.Namespace, scratch: Path):
    from backend.engine import InferenceEngine

    if args.model_dir is not None:
        return InferenceEngine.from_model_dir(args.model_dir, device=args.device, dtype=args.dtype)
    import torch

    from backend.checkpoints import load_upstream
    from backend.tiny_upstream import build_tiny_upstream

    files = build_tiny_upstream(scratch)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model = load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                          image_size=files.sizes.image_size, dtype=dtype, device=args.device)
    return InferenceEngine(model, model_id="tiny-random")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


if __name__ == "__main__":
    raise SystemExit(main())
