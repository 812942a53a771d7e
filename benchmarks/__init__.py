"""Developer benchmarks: ours against transformers' PyTorch LLaVA on the same weights and inputs (needs torch).

`svdprune-jax bench` is `run.main`; its arguments are parsed here, without torch, so `--help` works on any install.
"""
import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

GEOMETRIES = ("llava-1.5-7b", "llava-next-7b")

TORCH_HINT = ("bench compares against transformers' PyTorch LLaVA and needs torch: pip install "
              "'svdprune-jax[bench]' (or any torch build; CPU is enough)")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Speed of ours (JAX, jitted) against transformers PyTorch, "
                                 "same random weights and inputs: one table of ratios per geometry "
                                 "(bench.md, bench-next.md; .json beside).")
    ap.add_argument("--smoke", action="store_true", help="tiny configs, seconds (CI)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--reps", type=int, default=None,
                    help="timed runs per figure (default 5, llava-next-7b 3; smoke 1)")
    ap.add_argument("--geometry", nargs="+", choices=GEOMETRIES, help="llava-1.5-7b (bench.md: items 1-5, ~30 min) "
                    "and/or llava-next-7b (bench-next.md: 5 views, 2,880 image tokens, unpruned and k=320/160/64, "
                    "~10 min); default llava-1.5-7b, with --smoke both")
    ap.add_argument("--compile-probe", choices=("stacked", "per_layer"), help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog).parse_args(argv)
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps {args.reps}: must be at least 1")
    if importlib.util.find_spec("torch") is None:
        raise ValueError(TORCH_HINT)
    from svdprune_jax.benchmarks import run
    return run.run(args)
