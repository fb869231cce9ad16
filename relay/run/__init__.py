"""Running the relay: the CLI, the server's start and shutdown, systemd."""
