"""The ``revq-ray`` command: one entry point that delegates to each module's ``main(argv)``.

    revq-ray quickstart [--output runs/quickstart] [--fast]
    revq-ray encode ...     (python -m revq_ray.encode)
    revq-ray train ...      (python -m revq_ray.train)
    revq-ray tune ...       (python -m revq_ray.tune)
    revq-ray eval ...       (python -m revq_ray.eval)
    revq-ray compare ...    (python -m revq_ray.compare)
    revq-ray tokenize ...   (python -m revq_ray.tokenize)
    revq-ray detokenize ... (python -m revq_ray.detokenize)
    revq-ray prior ...      (python -m revq_ray.prior: stage 2, a transformer prior on the ids)
    revq-ray sample ...     (revq_ray.prior.sampling: the prior's samples as images)
    revq-ray vae ...        (python -m revq_ray.vae)
    revq-ray import-revq / export-revq ...  (revq_ray.published: the authors' published checkpoints)

Subcommand modules are imported only when chosen, so ``revq-ray --help`` is instant and a missing optional
dependency of one subcommand never breaks the others.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name -> (one-line help, the module whose ``main(argv)`` runs it)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "offline end-to-end demo: photos -> built-in VAE -> latents -> ReVQ -> report",
        "revq_ray.quickstart",
    ),
    "encode": ("media -> VAE latent shards + manifest (Ray Data)", "revq_ray.encode"),
    "train": ("train a quantizer + rectifier on latent shards (Ray Train + DeepSpeed)", "revq_ray.train"),
    "tune": ("hyperparameter search over train (Ray Tune)", "revq_ray.tune"),
    "eval": ("metrics and a report for a trained model", "revq_ray.eval"),
    "compare": ("ReVQ vs SimVQ vs GQ vs VQ (+ ablations) at equal bits", "revq_ray.compare"),
    "vae": ("train / inspect the built-in Gaussian VAEs", "revq_ray.vae.__main__"),
    "import-revq": (
        "the ReVQ authors' published tokenizers -> a Tokenizer bundle",
        "revq_ray.published.import_revq",
    ),
    "export-revq": ("a revq-ray model -> the authors' ckpt.pth + yaml", "revq_ray.published.export_revq"),
    "tokenize": ("images / audio -> token ids (.npy or shards) + manifest", "revq_ray.tokenize"),
    "detokenize": ("token ids from tokenize -> images / audio", "revq_ray.detokenize"),
    "prior": (
        "train a class-conditional transformer prior on token ids (Ray Train + DeepSpeed)",
        "revq_ray.prior",
    ),
    "sample": ("sample a trained prior: ids -> images (PNGs + a grid per class)", "revq_ray.prior.sampling"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: revq-ray <command> [args ...]",
        "",
        "Turn a frozen, pre-trained VAE into a discrete tokenizer (ReVQ, SimVQ, GQ) with Ray and DeepSpeed.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += [
        "",
        "Run 'revq-ray <command> --help' for a command's options. "
        "New here? Start with 'revq-ray quickstart'.",
    ]
    return "\n".join(lines)


def resolve(command: str) -> Callable[[list[str]], int | None]:
    """The ``main(argv)`` of a subcommand; raises ``SystemExit`` with a clear message when unavailable."""
    if command not in COMMANDS:
        raise KeyError(command)
    module_name = COMMANDS[command][1]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # A missing optional dependency of one subcommand must not look like a crash of the others.
        raise SystemExit(f"revq-ray {command}: this subcommand is not available ({err})") from None
    return module.main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revq-ray`` console script and ``python -m revq_ray``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(
            f"\nrevq-ray: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    rc = resolve(command)(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
