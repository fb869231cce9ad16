"""Clients nobody here wrote, in Node: the Vercel AI SDK's default OpenAI provider (``openai(model)``
calls the Responses API) and the official Node ``openai`` SDK, against the relay and its demo model.

Their packages come from the npm registry when the test runs (tests/node/package.json pins them)
into a temporary directory; nothing of them is committed.  Node and npm: Debian's ``nodejs`` and
``npm`` (.ci/run installs them; without them the test skips, or fails under RELAY_REQUIRE_ALL=1).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import require

NODE = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="session")
def node_clients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("node") is not None and shutil.which("npm") is not None,
            "node and npm are not installed (apt-get install nodejs npm)")
    where = tmp_path_factory.mktemp("node-clients")
    for name in ("package.json", "clients.mjs"):
        shutil.copy(NODE / name, where / name)
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"], cwd=where,
                          capture_output=True, text=True, timeout=600)
    require(done.returncode == 0 or "ENOTFOUND" not in done.stderr, "the npm registry is not reachable")
    assert done.returncode == 0, done.stderr[-2000:]
    return where


async def test_the_ai_sdks_default_provider_and_the_node_sdk_stream_through_the_demo_model(
        node_clients: Path, make_relay: Any) -> None:
    relay = await make_relay(upstream=None, model=None, demo_token_delay=0.0)
    env = {"PATH": os.environ.get("PATH", ""), "RELAY_BASE_URL": str(relay.make_url("/v1")),
           "RELAY_MODEL": "relay-demo"}
    proc = await asyncio.create_subprocess_exec("node", "clients.mjs", cwd=node_clients, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert "hello from the AI SDK" in got["aiStreamText"] and got["aiFinishReason"] == "stop"
    assert got["aiUsage"]["outputTokens"] > 0
    assert "hello again" in got["aiGenerateText"]
    assert "hello from node" in got["nodeResponsesText"]
    assert (got["nodeResponsesFirst"], got["nodeResponsesLast"]) == ("response.created", "response.completed")
    assert "hello chat" in got["nodeChatText"]
    assert got["notFound"].startswith("404") and "no route /v1/embeddings" in got["notFound"]
