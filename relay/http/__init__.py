"""HTTP: the two views (/chat, /v1) and everything per request (access, limits, SSE responses)."""
