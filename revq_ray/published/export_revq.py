"""``revq-ray export-revq``."""

from revq_ray.published.cli import export_main as main

__all__ = ["main"]
