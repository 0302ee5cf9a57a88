"""The explained layers' ``call`` intercepted while the model runs: ``Intercept`` and ``run``.

Each layer's ``call`` is replaced, for the calling thread only, by a wrapper that hands the
layer's output (or its input, for port ``"input"``) to a tap and lets the model continue with
what the tap returns; each framework's adapter decides in its tap how the tensor becomes
differentiable. The original ``call`` is always restored.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from anycam._errors import AnycamError, LayerError

_MISSING = object()
# Held while a layer's call is replaced: two threads tracing at once must not save each
# other's wrappers as the "original".
_PATCH_LOCK = threading.RLock()


Tap = Callable[[int, Any], Any]
"""``tap(index, value) -> value``: receives explained layer ``index``'s tensor, returns what flows on."""


class Intercept:
    """Replaces each layer's ``call`` by a tapping wrapper; restores it on exit, always.

    The wrapper hands the layer's output (or, for port ``"input"``, its first positional input)
    to ``tap`` and lets the model continue with what ``tap`` returns, so each framework decides
    how the tensor is made differentiable. Only the thread that entered is tapped; errors
    raised by ``tap`` are collected in ``errors`` (Keras re-creates exceptions raised inside a
    layer's call with the call's arguments appended) and raised by :func:`run`.
    """

    def __init__(
        self,
        layers: Sequence[Any],
        names: Sequence[str],
        tap: Tap,
        ports: Sequence[str] | None = None,
        *,
        once: bool = True,
    ) -> None:
        self.layers = layers
        self.once = once
        self.names = names
        self.tap = tap
        self.ports = tuple(ports) if ports is not None else ("output",) * len(layers)
        self.tapped: set[int] = set()
        self.errors: list[Exception] = []
        self.saved: list[Any] = []

    def _take(self, index: int, value: Any) -> Any:
        if self.errors:
            return value
        if self.once and index in self.tapped:
            self.errors.append(
                LayerError(
                    f"layer {self.names[index]!r} runs more than once per forward pass (a "
                    "shared layer); explain a layer that runs once"
                )
            )
            return value
        try:
            tapped = self.tap(index, value)
        except AnycamError as exc:
            self.errors.append(exc)
            return value
        self.tapped.add(index)
        return tapped

    def _wrapper(self, index: int, original: Callable[..., Any], owner: int) -> Callable[..., Any]:
        port = self.ports[index]

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return original(*args, **kwargs)
            if port == "input":
                if args:
                    args = (self._take(index, args[0]), *args[1:])
                else:
                    key = next(iter(kwargs), None)
                    if key is None:
                        self.errors.append(LayerError(f"layer {self.names[index]!r} was called without an input"))
                    else:
                        kwargs = {**kwargs, key: self._take(index, kwargs[key])}
                return original(*args, **kwargs)
            return self._take(index, original(*args, **kwargs))

        return call

    def __enter__(self) -> Intercept:
        owner = threading.get_ident()
        _PATCH_LOCK.acquire()
        try:
            for index, layer in enumerate(self.layers):
                self.saved.append(layer.__dict__.get("call", _MISSING))
                # object.__setattr__: Keras's __setattr__ would try to track the function.
                object.__setattr__(layer, "call", self._wrapper(index, layer.call, owner))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        # In reverse, so a layer listed twice gets its own call back, not the first wrapper.
        for layer, saved in reversed(list(zip(self.layers, self.saved, strict=False))):
            if saved is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", saved)
        self.saved = []
        _PATCH_LOCK.release()


def run(
    forward: Callable[[], Any],
    layers: Sequence[Any],
    names: Sequence[str],
    tap: Tap,
    ports: Sequence[str] | None = None,
) -> Any:
    """Returns ``forward()`` run with the layers tapped; every layer must be tapped exactly once.

    Raises:
        anycam.LayerError: a tap failed, a layer ran twice (a shared layer) or did not run.
    """
    with Intercept(layers, names, tap, ports) as intercept:
        output = forward()
    if intercept.errors:
        raise intercept.errors[0]
    missing = [name for index, name in enumerate(names) if index not in intercept.tapped]
    if missing:
        raise LayerError(
            f"layer(s) {', '.join(map(repr, missing))} did not run during the forward pass; "
            "explain a layer on the path from the input to the output"
        )
    return output
