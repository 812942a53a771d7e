"""Leverage-score solvers at LLaVA-1.5 geometry (N=576 tokens, D=1024): speed and float32 accuracy; and the
time per image of every selector (method spec) at the bundled model's geometry and at LLaVA-1.5's.

    OPENBLAS_NUM_THREADS=1 python -m svdprune_jax.benchmarks.scoring [--rank 64] [--reps 7] [--torch-threads 1]
                                                        [--part solvers|selectors|all]

Selectors (`SELECTORS`, method specs as the command line spells them): `prune` on one image under jit at the
paper's 64/576 budget share (k=16 of N=144, D=128; k=64 of N=576, D=1024), median (best) ms after a warm-up
call, compile time apart; the adaptive spec's row is choosing the image's budget (`adaptive_budget`), the
selection after it costs what its fixed form costs at the chosen bucket.

Times (median and best ms after one warm-up call, compile time separately) for one image and a vmap batch of 8:
our solvers under jit, NumPy float64 SVD leverage and torch.linalg.svd float32 leverage. Then the max
relative error (max |l - l64| / max l64) of each solver against the float64 reference on Gaussian,
low-rank-plus-noise and CLIP-like matrices (ranks 16/64, centred, energy 0.9).
The "auto" solver is chosen from these numbers: the fastest solver that stays within 1e-4 everywhere.

On a shared machine set OPENBLAS_NUM_THREADS=1: jax's CPU LAPACK kernels (svd, eigh, qr) and NumPy run
on scipy's OpenBLAS, whose spinning threads made jnp.linalg.svd 6-8x slower under load from other
processes here; give torch the same thread count with --torch-threads.
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import svdprune_jax as sp  # noqa: E402
from svdprune_jax.inference.methods import parse  # noqa: E402

N, D, B = 576, 1024, 8
SOLVERS = ("svd", "gram", "randomized")
GEOMETRIES = ((144, 128, 16), (576, 1024, 64))  # (N, D, k): the bundled model's tower, LLaVA-1.5's; k = 64/576 N
SELECTORS = ("svd", "svd:center=false", "svd:rank=k", "svd:rank=k:center=false", "svd:solver=gram", "lrcp",
             "norm", "cls_attention", "random", "divprune", "visionzip", "svd:merge=true", "svd:adaptive=0.9")


def spectra_like_clip(rng, n: int, d: int) -> np.ndarray:
    """One CLIP-like (n, d) matrix: power-law spectrum plus a shared mean token (see `spectra`)."""
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    base = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.7 @ q
    return (base + 3 * np.abs(base).mean() * rng.standard_normal(d)).astype(np.float32)


def spectra(rng) -> dict[str, np.ndarray]:
    """Test matrices: i.i.d. Gaussian; rank-32 signal plus 1% noise; and a CLIP-like matrix (power-law
    spectrum plus a shared mean token three times the typical entry, the dominant direction that raw
    vision features have)."""
    return {
        "gaussian": rng.standard_normal((N, D)),
        "lowrank32+noise": rng.standard_normal((N, 32)) @ rng.standard_normal((32, D))
        + 0.06 * rng.standard_normal((N, D)),
        "clip-like": spectra_like_clip(rng, N, D),
    }


def leverage64(x: np.ndarray, rank: int) -> np.ndarray:
    u = np.linalg.svd(x.astype(np.float64), full_matrices=False)[0]
    return (u[..., :rank] ** 2).sum(-1)


def energy_rank(x: np.ndarray, energy: float) -> int:
    s2 = np.linalg.svd(x.astype(np.float64), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy) + 1)


def leverage_torch(x: torch.Tensor, rank: int) -> torch.Tensor:
    u = torch.linalg.svd(x, full_matrices=False)[0]
    return (u[..., :rank] ** 2).sum(-1)


def timings(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """(median, best) ms per callable after one warm-up call each; the callables take turns every round
    so that load from other processes on a shared machine spreads over all of them alike."""
    for fn in fns.values():
        fn()
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name].append(1e3 * (time.perf_counter() - t))
    return {name: (float(np.median(t)), min(t)) for name, t in ts.items()}


def selector(text: str, k: int):
    """One image's selection (indices) by a method spec at budget k; an adaptive spec: its chosen budget."""
    spec = parse(text, sp.METHODS)
    if spec.adaptive is not None:
        return lambda x, attn: sp.adaptive_budget(x, spec.adaptive, sp.budget_buckets(k), **dict(spec.rule()))
    return lambda x, attn: sp.prune(x, k, spec.method, key=jax.random.key(0), cls_attention=attn,
                                    **dict(spec.options))[1]


def selector_times(reps: int) -> None:
    """Time per image of every selector at each geometry, printed side by side."""
    rng = np.random.default_rng(1)
    fns, compile_ms = {}, {}
    for n, d, k in GEOMETRIES:
        x = jax.device_put(spectra_like_clip(rng, n, d))
        attn = jax.device_put(rng.dirichlet(np.ones(n)).astype(np.float32))
        for text in SELECTORS:
            t = time.perf_counter()
            compiled = jax.jit(selector(text, k)).lower(x, attn).compile()
            compile_ms[text, n] = 1e3 * (time.perf_counter() - t)
            fns[text, n] = lambda c=compiled, x=x, attn=attn: jax.block_until_ready(c(x, attn))
    ms = timings(fns, reps)
    print(f"\nselector time per image: median (best) ms of {reps} runs after warm-up; compile ms apart")
    heads = [f"N={n} D={d} k={k}" for n, d, k in GEOMETRIES]
    print(f"{'selector':28s}" + "".join(f"{h:>28s}" for h in heads))
    print(f"{'':28s}" + f"{'compile':>9s}{'median (best)':>19s}" * len(GEOMETRIES))
    for text in SELECTORS:
        cells = [f"{compile_ms[text, n]:9.0f}{ms[text, n][0]:11.2f} ({ms[text, n][1]:5.2f})" for n, _, _ in GEOMETRIES]
        print(f"{text + (' (choose k)' if 'adaptive' in text else ''):28s}" + "".join(cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--part", choices=("solvers", "selectors", "all"), default="all")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.part != "solvers":
        selector_times(args.reps)
    if args.part == "selectors":
        return
    rng = np.random.default_rng(0)
    inputs = {1: rng.standard_normal((N, D)).astype(np.float32), B: rng.standard_normal((B, N, D)).astype(np.float32)}
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({args.torch_threads} threads), "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"N={N}, D={D}, rank={args.rank}; batch {B} = jax.vmap / stacked NumPy and torch calls")
    scorers = {f"jax {s}": (lambda x, s=s: sp.leverage_scores(x, args.rank, solver=s)) for s in SOLVERS}
    scorers["jax svd energy=0.9"] = lambda x: sp.leverage_scores(x, energy=0.9, solver="svd")
    scorers["jax gram energy=0.9"] = lambda x: sp.leverage_scores(x, energy=0.9, solver="gram")
    fns, compile_ms = {}, {}
    for name, f in scorers.items():
        for b, x in inputs.items():
            xd = jax.device_put(x)
            t = time.perf_counter()
            compiled = (jax.jit(f) if b == 1 else jax.jit(jax.vmap(f))).lower(xd).compile()
            compile_ms[name, b] = 1e3 * (time.perf_counter() - t)
            fns[name, b] = lambda c=compiled, xd=xd: jax.block_until_ready(c(xd))
    for b, x in inputs.items():
        xt = torch.from_numpy(x)
        fns["numpy float64 svd", b] = lambda x=x: leverage64(x, args.rank)
        fns["torch.linalg.svd float32", b] = lambda xt=xt: leverage_torch(xt, args.rank)
    with torch.inference_mode():
        ms = timings(fns, args.reps)
    print(f"median (best) ms of {args.reps} runs after warm-up; compile separately")
    print(f"{'scorer':26s} {'compile':>8s} {'1 image':>16s} {'compile':>8s} {f'batch {B}':>16s}")
    for name in dict.fromkeys(n for n, _ in fns):
        cells = []
        for b in inputs:
            c = compile_ms.get((name, b))
            med, best = ms[name, b]
            cells += [f"{c:8.0f}" if c else f"{'-':>8s}", f"{med:9.1f} ({best:5.0f})"]
        print(f"{name:26s} " + " ".join(cells))

    mats = spectra(rng)
    r90 = energy_rank(mats["clip-like"], 0.9)
    cases = {  # name: (matrix, options); the float64 reference uses the same rank / centring
        "gaussian": ("gaussian", dict(rank=args.rank)),
        "lowrank r16": ("lowrank32+noise", dict(rank=16)),
        "lowrank": ("lowrank32+noise", dict(rank=args.rank)),
        "clip-like": ("clip-like", dict(rank=args.rank)),
        "clip centred": ("clip-like", dict(rank=args.rank, center=True)),
        f"clip e=.9 (r={r90})": ("clip-like", dict(energy=0.9)),
    }
    print(f"\nmax |l - l64| / max l64 against float64 SVD leverage (rank {args.rank} unless named)")
    print(f"{'solver':12s}" + "".join(f"{c:>19s}" for c in cases))
    for s in SOLVERS + ("torch",):
        cells = []
        for m, o in cases.values():
            x = mats[m].astype(np.float32)
            x64 = x - x.mean(0) if o.get("center") else x
            rank = o.get("rank") or r90
            ref = leverage64(x64, rank)
            if s == "torch":
                got = leverage_torch(torch.from_numpy(x64.astype(np.float32)), rank).numpy()
            elif s == "randomized" and "energy" in o:
                got = None
            else:
                got = np.asarray(sp.leverage_scores(x, solver=s, **o))
            cells.append(f"{'-':>19s}" if got is None else f"{np.abs(got - ref).max() / ref.max():19.1e}")
        print(f"{s:12s}" + "".join(cells))
    print(f"\nauto -> {sp.AUTO_SOLVER!r}")


if __name__ == "__main__":
    main()
