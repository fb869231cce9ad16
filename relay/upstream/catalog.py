"""What the relay serves: the default model, the models clients may name, whether it is the demo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Catalog:
    #: Used when a request names no model; None: every request must name one.
    default_model: str | None
    #: ``--allow-model``; empty allows any.
    allowed: tuple[str, ...]
    #: Relaying through the built-in demo model (the ``start`` event says so).
    demo: bool

    def listed(self) -> tuple[str, ...]:
        """What ``GET /v1/models`` lists: the allowlist, else the default model."""
        return self.allowed or ((self.default_model,) if self.default_model else ())
