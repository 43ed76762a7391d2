"""``revq-ray import-revq``."""

from revq_ray.published.cli import import_main as main

__all__ = ["main"]
