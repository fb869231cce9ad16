"""Typed application state (``web.AppKey``), shared by the app factory and the handlers."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from relay.config import Config
from relay.registry import Registry
from relay.upstream import UpstreamClient

CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
SESSION = web.AppKey("session", aiohttp.ClientSession)
