"""An engine the tests can hold: `GatedEngine` wraps a real InferenceEngine so that every call first passes a
gate, on the service's engine thread. Holding it is how a test makes queries queue up or a sweep stay running, and
a gate that raises stands for a fault inside the model; the service itself has no hook for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

WAIT_S = 20.0  # seconds a test waits for the engine thread before it fails


class Gate:
    """Open by default; while closed, an engine call waits here for a permit (`let_through`) or the opening."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._permits = 0
        self._waiting = 0  # engine threads waiting at the gate

    def __call__(self) -> None:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._closed or self._permits > 0)
            if self._closed:
                self._permits -= 1
            self._waiting -= 1

    def close(self) -> None:
        with self._cond:
            self._closed, self._permits = True, 0

    def let_through(self, batches: int = 1) -> None:
        with self._cond:
            self._permits += batches
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._closed, self._permits = False, 0
            self._cond.notify_all()

    def wait_until_held(self) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self._waiting > 0, WAIT_S), "the engine never reached the gate"


class GatedEngine:
    """`engine` with `before_call()` run before each of its service calls (run, chat); everything else is the
    engine's own."""

    def __init__(self, engine: Any, before_call: Callable[[], None]) -> None:
        self._engine = engine
        self._before_call = before_call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._before_call()
        return self._engine.run(*args, **kwargs)

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        self._before_call()
        return self._engine.chat(*args, **kwargs)
