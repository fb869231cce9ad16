"""The relay installed like a Python tool: built as the index would build it, installed from the
wheel (not editable) into a fresh environment, serving its page."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import aiohttp

from conftest import require
from procs import REPO

ASSET = re.compile(r'(?:src|href)="(/static/[^"]+)"')
IMPORT = re.compile(r'(?:from|import)\s*\(?\s*"(\./[^"]+|\.\./[^"]+)"')


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_wheel_built_from_the_sdist_serves_the_page_with_every_asset(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # python -m build makes the sdist, then the wheel from the sdist: the page must survive both.
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    require(built.returncode == 0 or "Could not find a version" not in built.stderr,
            "the package index is not reachable for the build's own requirements")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next(dist.glob("*.whl"))
    sdist = next(dist.glob("*.tar.gz"))
    with zipfile.ZipFile(wheel) as z:
        assert "relay/web/index.html" in z.namelist() and "relay/web/vendor/LICENSE.marked" in z.namelist()
    with tarfile.open(sdist) as t:
        assert any(n.endswith("relay/web/vendor/VERSIONS.md") for n in t.getnames())
    # A fresh environment with the wheel alone; its dependencies from this one (no index needed).
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    installed = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    site = next(env_dir.glob("lib/python*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "aiohttp").is_dir())
    (site / "deps.pth").write_text(ours + "\n")
    python = env_dir / "bin" / "python"
    assert (env_dir / "bin" / "relay").is_file()  # the console script
    where = subprocess.run([str(python), "-c", "import relay, sys; print(relay.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        str(env_dir / "bin" / "relay"), "serve", "--port", str(port), "--log-level", "warning", cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/") as resp:
                            page = await resp.text()
                            assert resp.status == 200
                            break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.05)  # the process is starting: nothing to await
            todo = ASSET.findall(page)
            seen: set[str] = set()
            while todo:
                path = todo.pop()
                if path in seen:
                    continue
                seen.add(path)
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 200, path
                    body = await resp.text()
                if path.endswith(".js"):
                    base = path.rsplit("/", 1)[0]
                    for rel in IMPORT.findall(body):
                        parts = (base + "/" + rel).split("/")
                        out: list[str] = []
                        for part in parts:
                            if part == "..":
                                out.pop()
                            elif part != ".":
                                out.append(part)
                        todo.append("/".join(out))
        assert {"/static/app.js", "/static/style.css", "/static/vendor/marked.esm.js"} <= seen, seen
        assert len(seen) > 20
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert "chat page is missing" not in err.decode()


async def test_a_start_without_the_page_says_so_in_one_line(
        aiohttp_client: object, tmp_path: Path, monkeypatch: object, caplog: object) -> None:
    import logging

    import pytest

    from relay.config import Config
    from relay.http import app as app_module

    assert isinstance(monkeypatch, pytest.MonkeyPatch) and isinstance(caplog, pytest.LogCaptureFixture)
    monkeypatch.setattr(app_module, "DEFAULT_WEB_ROOT", tmp_path / "web")
    with caplog.at_level(logging.WARNING, logger="relay"):
        app_module.make_app(Config())
    lines = [r for r in caplog.records if "chat page is missing" in r.getMessage()]
    assert len(lines) == 1 and "GET / answers 404" in lines[0].getMessage()
