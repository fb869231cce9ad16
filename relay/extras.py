"""The optional extras, and the one way to tell a user how to add one.

A hint must work wherever the relay was installed from: a checkout's ``.venv``, a wheel, pipx or
uv tool.  The distribution is not on the package index, so ``pip install 'llm-sse-relay[redis]'``
cannot work; what does is installing the extra's own requirements into the Python that runs the
relay, named by its path.  setup.cfg's extras and this table are kept equal by a test.
"""

from __future__ import annotations

import shlex
import sys
from typing import Final

#: Extra name → its requirements, as in setup.cfg's ``[options.extras_require]``.
EXTRAS: Final = {
    "redis": ("redis[hiredis]>=5",),
    "metrics": ("prometheus-client>=0.22",),
    "uvloop": ("uvloop>=0.19",),
}


def install_hint(extra: str) -> str:
    """The command that adds ``extra`` to the Python running the relay."""
    return " ".join([shlex.quote(sys.executable), "-m", "pip", "install", *map(shlex.quote, EXTRAS[extra])])
