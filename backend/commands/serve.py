"""`minigpt-pancreas serve`: the HTTP service for the Slicer module, on 127.0.0.1:8765 by default.

The port is taken before the model loads, so a port clash is reported at once; the model then loads on the engine
thread while /healthz answers "loading" (the client shows "still loading", not "no server"). A host beyond loopback
needs an access token (--token or $MINIGPT_PANCREAS_TOKEN), checked before anything else.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DTYPES = ("float32", "float16", "bfloat16")
GRACEFUL_SHUTDOWN_S = 5  # requests still waiting for the model when the server stops get this long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="a model folder (from import-upstream or training export)")
    source.add_argument("--upstream", nargs=3, metavar=("VIT", "LLAMA", "CKPT"),
                        help="the original files: eva_vit_g.pth, a LLaMA-2 HF folder, a MiniGPT .pth checkpoint")
    parser.add_argument("--image-size", type=int, default=448,
                        help="with --upstream: model input side in pixels (default 448)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute precision (default: float32 on the CPU, bfloat16 or float16 on a GPU)")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), default=None,
                        help="load the LLaMA weights in 8 or 4 bits (CUDA + bitsandbytes)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per model call in sweeps (default 8)")
    parser.add_argument("--constrain-boxes", action="store_true",
                        help="let the model answer detection prompts ('[refer] ...') only with one box")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this computer only; any other "
                             "needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--token", default=None,
                        help="access token clients must send (default: $MINIGPT_PANCREAS_TOKEN; prefer the "
                             "variable: command lines are visible to other users)")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="slice queries waiting for the model before the server answers 'busy' (default 8)")
    parser.add_argument("--volume-memory", type=float, default=2.0, metavar="GIB",
                        help="memory for uploaded volumes in GiB; the least recently used go first (default 2)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def run(args: argparse.Namespace) -> int:
    from backend.service.security import ServeSettingsError, check_bind, check_token, resolve_token

    token = check_token(resolve_token(args.token))
    check_bind(args.host, token)
    if not 1 <= args.port <= 65535:
        raise ServeSettingsError(f"--port must be in 1-65535, got {args.port}")
    device = _device(args.device)
    load_engine = _engine_loader(args, device)  # checks the model files exist before the port is taken
    sock = bind_socket(args.host, args.port)
    try:
        return _serve(args, sock, load_engine, token, device)
    finally:
        sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); ServeSettingsError with what to do if that fails."""
    from backend.service.security import ServeSettingsError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ServeSettingsError(f"--host {host} is not an address or a known host name ({error.strerror})") \
            from error
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop is fine
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ServeSettingsError(f"port {port} is in use: is another server running? use --port") from error
        if error.errno == errno.EADDRNOTAVAIL:
            raise ServeSettingsError(f"--host {host} is not an address of this computer") from error
        if error.errno == errno.EACCES:
            raise ServeSettingsError(f"port {port} needs administrator rights; use a port above 1023") from error
        raise ServeSettingsError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    return sock


def _device(name: str) -> str:
    import torch

    from backend.service.security import ServeSettingsError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ServeSettingsError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    try:
        return str(torch.device(name))
    except RuntimeError as error:
        raise ServeSettingsError(f"--device {name} is not a torch device (cpu, cuda, cuda:N)") from error


def _engine_loader(args: argparse.Namespace, device: str):
    """A function that loads the engine (run on the engine thread), after a quick check that the files exist."""
    from functools import partial

    from backend.engine import load_engine

    if args.model is not None:
        from backend.model_dir import read_manifest

        read_manifest(args.model)  # CheckpointError (a ValueError) when it is not a model folder
    else:
        vit, llama, checkpoint = (Path(path) for path in args.upstream)
        for path, what, exists in ((vit, "EVA ViT file", vit.is_file()), (llama, "LLaMA folder", llama.is_dir()),
                                   (checkpoint, "MiniGPT checkpoint", checkpoint.is_file())):
            if not exists:
                raise FileNotFoundError(f"--upstream: the {what} {path} does not exist")
    return partial(load_engine, model_dir=args.model, upstream=args.upstream, image_size=args.image_size,
                   device=device, dtype=args.dtype, quantization=args.quantization, batch_size=args.batch_size)


def _serve(args: argparse.Namespace, sock: socket.socket, load_engine, token: str | None, device: str) -> int:
    import uvicorn

    from backend.service import ServiceLimits, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    limits = ServiceLimits(max_queue=args.max_queue, volume_memory_bytes=int(args.volume_memory * (1 << 30)))
    app = create_app(load_engine=load_engine, token=token, limits=limits, constrain_boxes=args.constrain_boxes,
                     device_hint=device)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    access = "an access token is required" if token else "no token: this computer only"
    print(f"MiniGPT-Pancreas server on http://{args.host}:{args.port} ({access}); loading the model on {device} "
          "(GET /healthz says 'ok' when ready; Ctrl+C stops)", flush=True)
    server.run(sockets=[sock])
    return 0 if server.started else 1
