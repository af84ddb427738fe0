"""What the in-process FedAvg tests share: a model store in memory, and the roles played as threads."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np


class MemoryStore:
    """The coordinator's model store (``protocol.ModelStore``) in a dict: theta per round."""

    def __init__(self) -> None:
        self.models: dict[int, np.ndarray] = {}

    def current(self):
        return (max(self.models), self.models[max(self.models)]) if self.models else (0, None)

    def apply(self, round_: int, step: np.ndarray) -> np.ndarray:
        self.models[round_] = self.models.get(round_ - 1, 0.0) + step
        return self.models[round_].copy()


def play_all(coordinator: Any, parties: dict[str, Any], join_s: float = 60,
             after_coordinator: Callable[[], None] | None = None) -> dict[str, BaseException]:
    """Each party's ``run`` in a thread and the coordinator's in this one; what each raised, by name
    (``coord`` for the coordinator). ``after_coordinator`` runs once it has returned, before the joins."""
    errors: dict[str, BaseException] = {}

    def play(name: str, role: Any) -> None:
        try:
            role.run()
        except BaseException as exc:   # collected for the test to look at
            errors[name] = exc

    threads = [threading.Thread(target=play, args=(n, p), daemon=True) for n, p in parties.items()]
    for t in threads:
        t.start()
    play("coord", coordinator)
    if after_coordinator is not None:
        after_coordinator()
    for t in threads:
        t.join(join_s)
    return errors
