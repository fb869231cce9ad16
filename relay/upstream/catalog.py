"""What the relay serves: the default model, the models clients may name, whether it is the demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.upstream.pool import Pool


@dataclass(frozen=True, slots=True)
class Catalog:
    #: Used when a request names no model; None: every request must name one.
    default_model: str | None
    #: The models clients may name: ``--allow-model``, narrowed to (or, without it, made of) what
    #: the ``[[upstreams]]`` serve when none of them serves ``"*"``; empty allows any.
    allowed: tuple[str, ...]
    #: Relaying through the built-in demo model (the ``start`` event says so).
    demo: bool
    pool: Pool | None = None

    @classmethod
    def of(cls, pool: Pool, *, default_model: str | None, allowed: tuple[str, ...], demo: bool) -> Catalog:
        if not pool.any_model:
            served = pool.named_models()
            allowed = tuple(m for m in allowed if m in served) if allowed else tuple(served)
        return cls(default_model=default_model, allowed=allowed, demo=demo, pool=pool)

    async def listed(self) -> tuple[str, ...]:
        """What ``GET /v1/models`` lists, the default model first: the allowed models, else every
        model an upstream entry names and the own ``/models`` of each upstream serving ``"*"``."""
        names = dict.fromkeys([self.default_model] if self.default_model else [])
        if self.allowed:
            names.update(dict.fromkeys(self.allowed))
            return tuple(n for n in names if n in self.allowed)
        if self.pool is not None:
            names.update(dict.fromkeys(await self.pool.listed_models()))
        return tuple(names)
