"""What every entry point shares: Ray start-up, storage locations, logging, and ``--set KEY=VALUE``.

One helper each, so that ``python -m revq_ray.train``, ``.encode``, ``.tune``, ``compare``, ``quickstart`` and
``vae`` start Ray, name files and print progress the same way:

- :func:`init_ray`: join a cluster (``address`` or ``$RAY_ADDRESS``) or start a private local Ray.
- :func:`is_uri` / :func:`absolute`: a location is a local path or a URI (``s3://``, ``gs://``, ...); local
  paths are made absolute because Ray workers do not share the driver's working directory.
- :func:`set_dotted` / :func:`get_dotted`: ``"train.lr"``-style keys into nested dicts (config overrides,
  sweep parameters, compare rows).
- :func:`add_set_argument`: the repeatable ``--set KEY=VALUE`` option of every CLI.
- :func:`get_logger`: a standard :mod:`logging` logger under ``revq_ray``, one format, on stderr.

Imports nothing heavy at module level (no Ray, torch or pydantic), so any layer but the core may use it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "LOG_FORMAT",
    "absolute",
    "add_set_argument",
    "dashboard_missing",
    "extensions_dir",
    "get_dotted",
    "get_logger",
    "init_ray",
    "is_uri",
    "join_location",
    "set_dotted",
    "skip_failure",
    "MAX_SKIP_FRACTION",
]

LOG_FORMAT = "[%(name)s] %(message)s"
_ROOT_LOGGER = "revq_ray"


# --------------------------------------------------------------------------------------------- logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, Ray's log redirection)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_ROOT_LOGGER)
    # Configure once per process (drivers and every Ray worker import this module on their own). An
    # application that set up handlers on ``revq_ray`` itself keeps them.
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        # Our handler prints the record; the root logger (Ray's or the application's) would print it again.
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (e.g. ``"revq_ray.train"``), printing ``[revq_ray.train] message`` on stderr."""
    _configure_root()
    if name != _ROOT_LOGGER and not name.startswith(_ROOT_LOGGER + "."):
        name = f"{_ROOT_LOGGER}.{name}"
    return logging.getLogger(name)


_log = get_logger("revq_ray.runtime")


# --------------------------------------------------------------------------------------------- storage
def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (object stores, fsspec protocols); False for local paths."""
    return "://" in str(location)


def absolute(location: str | os.PathLike) -> str:
    """Local paths become absolute (``~`` expanded); URIs and the empty string stay as they are."""
    loc = str(location)
    return loc if not loc or is_uri(loc) else str(Path(loc).expanduser().resolve())


def join_location(root: str, *names: str) -> str:
    """``root/name/...`` for a local path or a URI (URIs always use ``/``)."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *names])
    return str(Path(root, *names))


# --------------------------------------------------------------------------------------------- skipped inputs
MAX_SKIP_FRACTION = 0.1
"""Default of ``--max-skip-fraction`` (encode and tokenize): the share of unreadable inputs a job accepts."""


def skip_failure(skipped: int, total: int, max_fraction: float, example: str = "") -> str:
    """The one rule of every job that skips unreadable inputs (``encode``, ``tokenize``): why the job failed
    ("" if it did not). It fails when nothing was read, or when more than ``max_fraction`` of the ``total``
    inputs were skipped; ``example`` (``"path: reason"``) names one of them."""
    first = f" (e.g. {example})" if example else ""
    if total and skipped >= total:
        return f"nothing was read: all {total} inputs were skipped{first}"
    fraction = skipped / total if total else 1.0
    if fraction > max_fraction:
        return (
            f"{skipped} of {total} inputs ({100 * fraction:.1f}%) were skipped, over the "
            f"{100 * max_fraction:g}% allowed{first}; the manifest lists each with its reason "
            "(--max-skip-fraction raises the limit)"
        )
    return ""


# --------------------------------------------------------------------------------------------- dotted keys
def get_dotted(data: dict[str, Any], key: str, default: Any = None) -> Any:
    """``data["a"]["b"]`` for ``key="a.b"``; ``default`` when any part is missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"`` in place, creating missing sections.

    Raises ``ValueError`` when a part of the path holds a value, not a section."""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"key {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------- CLI
def add_set_argument(
    parser: argparse.ArgumentParser,
    help: str,
    flag: str = "--set",
    dest: str = "overrides",
) -> None:
    """The repeatable ``--set KEY=VALUE`` option (dotted keys, YAML values) collected in ``args.<dest>``."""
    parser.add_argument(flag, dest=dest, action="append", default=[], metavar="KEY=VALUE", help=help)


# --------------------------------------------------------------------------------------------- Ray
def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops are cached: ``$TORCH_EXTENSIONS_DIR`` when set, else one folder per
    Python and torch version under ``~/.cache/revq_ray/torch_extensions``. An op loads only into the Python
    and torch that built it, and torch reuses a build found under an explicit ``TORCH_EXTENSIONS_DIR``
    without checking either (its own default folder names the Python, not torch), so environments of
    several Pythons on one machine (``make test PYTHON=python3.12``) must not share one folder."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "none"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch_version}"
    return Path.home() / ".cache" / "revq_ray" / "torch_extensions" / tag


def dashboard_missing() -> str | None:
    """Why Ray's dashboard cannot start here (the first of its packages that fails to import), or None.
    The imports are Ray's own list (``ray.dashboard.optional_deps``), the one ``ray.init`` checks."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except Exception as err:  # an ImportError, or a broken install of one of them
        return f"{type(err).__name__}: {err}"
    return None


def init_ray(
    address: str | None = None, num_cpus: int | None = None, *, include_dashboard: bool = True
) -> None:
    """Connect to a cluster or start a local Ray; a no-op when Ray is already initialized.

    Joins ``address`` if given, else ``$RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver, or by
    the user). Otherwise starts a private local instance with ``num_cpus`` logical CPUs (default: at least 8,
    above the core count, so Ray Data's readers are not starved by the training workers' reservations). It
    never attaches to some other Ray that happens to run on the machine unless told to (``--address auto``).

    What Ray really does with a local instance (Ray 2.60, checked by ``tests/cluster/test_local_ray.py``): it
    advertises the machine's primary address, not loopback (``ray.util.get_node_ip_address()``, e.g.
    ``--node-ip-address=192.0.2.2`` on the raylet; Ray ignores a ``_node_ip_address`` of 127.0.0.1 here), and
    opens its gRPC ports on all interfaces (it has no option to bind them to loopback). Only the dashboard
    (HTTP, job submission) is bound to 127.0.0.1. What guards the open ports is Ray's token authentication,
    on by default for a new local cluster unless ``RAY_AUTH_MODE`` says otherwise: a client without the token
    is refused. Do not turn it off on a machine others can reach. Where the dashboard's packages are missing
    (a minimal Ray), it starts without the dashboard and says so, whatever ``include_dashboard`` asks.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        _log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
        return
    n = num_cpus or max(8, os.cpu_count() or 1)
    missing = dashboard_missing() if include_dashboard else None
    if missing:
        # ray.init raises when include_dashboard=True meets a minimal Ray (no ray[default] extras: aiohttp,
        # opencensus, ...), as on a bare GPU image that got Ray as a wheel (benchmarks/gpu_check.sh).
        _log.warning(
            "starting Ray without its dashboard: its packages are missing (%s); pip install 'ray[default]' "
            "to have it", missing
        )  # fmt: skip
        include_dashboard = False
    # A busy laptop can take more than Ray's default minute to register the raylet.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
    # The dashboard (another free port when 8265 is taken) serves the state API that Ray Train's
    # placement-group cleaner polls: without it the driver log fills with its warnings.
    ray.init(
        address="local",  # a new instance: never the last `ray start` cluster on this machine
        num_cpus=n,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
    )
    _log.info("started a local Ray with %d logical CPUs", n)
