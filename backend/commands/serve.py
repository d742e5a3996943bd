"""`minigpt-pancreas serve`: the HTTP service for the Slicer module, on 127.0.0.1:8765 by default.

The port is taken before the model loads, so a port clash is reported at once; the model then loads on the engine
thread while /healthz answers "loading" (the client shows "still loading", not "no server"). What can be checked
cheaply is checked before the port is taken (options, the model folder's manifest: one line, exit 2); what only
loading finds (damaged weights) is one log line, and then /healthz and every API call say why (503
"model_unavailable"): the server stays up to tell the Slicer module. A host beyond loopback needs an access token
(--token or $MINIGPT_PANCREAS_TOKEN), checked before anything else. Without --model or --upstream it serves the
bundled demo model and says so first.

Connections: at most --max-connections at once (more are answered 503), and one that sends nothing for --keep-alive
seconds is closed. On SIGTERM or Ctrl+C it stops accepting connections and work, cancels the sweeps, answers every
request still waiting (its result if the model gets to it within --grace seconds, else 503 "shutting down") and
exits (backend/service/server.py).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

from backend.commands.model_options import add_model_arguments, engine_from_args, resolve_model_source

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_CONNECTIONS = 64
KEEP_ALIVE_S = 5.0
GRACE_S = 5.0
MAX_VOLUME_MEMORY_GIB = 1 << 20  # a pebibyte: beyond any machine, and still a whole number of bytes
MAX_WAIT_S = 86400.0  # a day: longer is a mistake, and inf or 1e308 overflow the timers


def number(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a number from `low` to `high` (nan and inf are refused: they overflow or never end)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be from {low:.15g} to {high:.15g}, got {text}")
        return value
    return parse


def whole_number(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--constrain-boxes", action="store_true",
                        help="let the model answer detection prompts ('[refer] ...') only with one box")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this computer only; any other "
                             "needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--token", default=None,
                        help="access token clients must send (default: $MINIGPT_PANCREAS_TOKEN; prefer the "
                             "variable: command lines are visible to other users)")
    parser.add_argument("--max-queue", type=whole_number(1), default=8,
                        help="slice queries waiting for the model before the server answers 'busy' (default 8)")
    parser.add_argument("--volume-memory", type=number(1 / 1024, MAX_VOLUME_MEMORY_GIB), default=2.0,
                        metavar="GIB",
                        help="memory for uploaded volumes in GiB, uploads in progress included; the least recently "
                             "used go first (default 2)")
    parser.add_argument("--max-connections", type=whole_number(1), default=MAX_CONNECTIONS, metavar="N",
                        help=f"connections and requests at once; more are answered 503 (default {MAX_CONNECTIONS})")
    parser.add_argument("--keep-alive", type=number(0.1, MAX_WAIT_S), default=KEEP_ALIVE_S, metavar="S",
                        help=f"close a connection that sends nothing for this long (default {KEEP_ALIVE_S:g} s)")
    parser.add_argument("--grace", type=number(0, MAX_WAIT_S), default=GRACE_S, metavar="S",
                        help="on shutdown, how long waiting requests may still get their answer; the rest get 503 "
                             f"(default {GRACE_S:g} s)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def run(args: argparse.Namespace) -> int:
    from backend.engine import resolve_device
    from backend.service.security import ServeSettingsError, check_bind, check_token, resolve_token

    token = check_token(resolve_token(args.token))
    check_bind(args.host, token)
    if not 1 <= args.port <= 65535:
        raise ServeSettingsError(f"--port must be in 1-65535, got {args.port}")
    resolve_model_source(args)  # the model files exist (and which model, first, if it is the bundled one)
    args.device = resolve_device(args.device)  # before the port is taken: a missing GPU is reported at once
    sock = bind_socket(args.host, args.port)
    try:
        return _serve(args, sock, token)
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


def _serve(args: argparse.Namespace, sock: socket.socket, token: str | None) -> int:
    from functools import partial

    from backend.service import ServiceLimits, create_app
    from backend.service.server import make_server

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    limits = ServiceLimits(max_queue=args.max_queue, volume_memory_bytes=int(args.volume_memory * (1 << 30)))
    app = create_app(load_engine=partial(engine_from_args, args), token=token, limits=limits,
                     constrain_boxes=args.constrain_boxes, device_hint=args.device)
    server = make_server(app, args.host, args.port, log_level=args.log_level, grace_s=args.grace,
                         keep_alive_s=args.keep_alive, max_connections=args.max_connections)
    access = "an access token is required" if token else "no token: this computer only"
    print(f"MiniGPT-Pancreas server on http://{args.host}:{args.port} ({access}); loading the model on {args.device} "
          "(GET /healthz says 'ok' when ready; Ctrl+C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if app.state.service.worker.thread_alive:
            # Ending the interpreter around a thread inside torch aborts it ("terminate called...", core dump):
            # leave at once instead; every request has had its answer.
            logging.getLogger(__name__).warning("exiting while the model is still busy")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if server.started else 1)
    return 0 if server.started else 1
