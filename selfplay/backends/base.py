"""The one shape of everything that runs a model for a stage: samplers (selfplay/backends/samplers/), reward scorers
(selfplay/rewards/scoring.py) and log-prob scorers (selfplay/backends/logprob_scorer.py).

    backend = Registry[cfg.<group>.backend].from_config(cfg, …)   built from the run's config
    with backend:                                                  owns its model or engines for the block
        result = backend(work, desc="…")                          one batch of work: a call per window

Outside a `with` block an engine-backed backend starts its engines for each call and stops them after it, so a lone
call (eval's scoring, `selfplay select`) frees the accelerator for whatever runs next; inside one the engines stay up
across calls, so a stage that streams its table window by window pays one engine start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Backend:
    """Base of every backend: a context manager around `close`, and `__call__` for the work."""

    _held = False  # inside a `with` block

    def __enter__(self) -> Any:
        self._held = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._held = False
        self.close()

    def __call__(self, *work: Any, **options: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the engines this backend started, if any (a model loaded in-process is freed with the object)."""

    @contextlib.contextmanager
    def engines_for_call(self) -> Iterator[None]:
        """Around the engine work of one call: outside a `with` block, `close` when it ends."""
        try:
            yield
        finally:
            if not self._held:
                self.close()
