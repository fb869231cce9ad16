"""The relay's benchmark: the relay against direct and nginx, side by side in one run (see README.md)."""
