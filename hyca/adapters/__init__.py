"""Thin adapters from the engine to each host: diffusers here, WebUI frontends beside it."""
