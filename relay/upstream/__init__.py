"""The model APIs: their configuration (config.py), one client each (client.py, response.py,
session.py), the pool that picks and fails over (pool.py) and the one exception (errors.py).

Nothing is imported here, so that relay/config.py can read the ``[[upstreams]]`` entries
(relay/upstream/config.py) without loading the client, which reads the settings.
"""
