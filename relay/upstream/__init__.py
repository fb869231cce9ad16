"""The model API: the client (request, timeouts, decoding into chunks) and its one exception."""

from relay.upstream.client import Chunk, Completion, UpstreamClient, UpstreamResponse
from relay.upstream.errors import UpstreamError

__all__ = ["Chunk", "Completion", "UpstreamClient", "UpstreamError", "UpstreamResponse"]
