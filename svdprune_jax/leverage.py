"""Leverage scores of a token matrix (SVD-Prune's criterion) and the LRCP residual, on one spectral core.

For X (N x D) with thin SVD X = U S V^T, the rank-r leverage of token i is l_i = sum_{j<r} U_ij^2: the
diagonal of the projector onto the top-r left singular subspace. 0 <= l_i <= 1, sum_i l_i = r.

Solvers (all float32; each agrees with a float64 NumPy SVD where it resolves the spectrum):
  "svd"         jnp.linalg.svd, thin (of the QR factor R^T when D >= 1.5 N). Accurate for any spectrum down
                to s_j ~ max(N, D) eps s_1.
  "gram"        eigh of the smaller Gram matrix (X X^T when N <= D, else X^T X with U = X V S^-1). ~2x cheaper
                on CPU, but forming the Gram squares the condition number: its float32 error grows like
                eps (s_1/s_r)^2, measured >1e-3 relative once s_1/s_r > ~30 (uncentred features with a dominant
                mean direction get there). Use it when the spectrum down to the cut is within ~10x of s_1.
  "randomized"  Halko-Martinsson-Tropp range finder (rank + 10 columns, 2 power iterations, fixed key 0,
                so deterministic) and an SVD of the small projected matrix. Rank mode only; approximate:
                exact only when the spectrum has a clear gap after the rank (measured in tests).
  "auto"        `AUTO_SOLVER` = "svd": benchmarks/scoring.py on CPU has "gram" faster but off by 5e-4 on a
                CLIP-like (dominant-mean) spectrum at rank 64 and by 0.6 with the cut in noise, so "svd" is
                the fastest solver accurate to 1e-4 everywhere. Not yet measured on GPU/TPU (jnp.linalg.svd
                is a known TPU weak spot, jax-ml/jax#10052, #28315): run the benchmark there before changing
                the default.
Directions at a solver's float32 noise floor (svd/randomized: s_j <= max(N, D) eps s_1; gram:
s_j^2 <= min(N, D) eps s_1^2) carry no information and are never counted, so a rank beyond the numerical
rank of X gives scores summing to the numerical rank, not to arbitrary null-space directions.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from svdprune_jax import checks

SOLVERS = ("auto", "svd", "gram", "randomized")
# Wide matrices (D >= 1.5 N) are first reduced to N x N by a GEMM-rich QR: LAPACK's gesdd does this itself only
# from D >= 11/6 N and otherwise bidiagonalises the whole wide matrix, mostly with matrix-vector products. On
# this CPU, one A/B each: 576 x 1024 (LLaVA's features) 1.5x faster, 576 x 4096 2.4x; no gain from 576 x 600 to
# 576 x 896, where timings were within the noise.
QR_FIRST_RATIO = 1.5
AUTO_SOLVER = "svd"  # what "auto" means: chosen by benchmarks/scoring.py (module docstring)
LRCP_RANK = 4  # LRCP (arXiv 2605.15621) subspace rank; the LLaVA port's choice
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_POWER_ITERS = 2
_EPS = float(jnp.finfo(jnp.float32).eps)


def _mm(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)  # TPU defaults to bf16 passes otherwise


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def spectrum(x: Float[Array, "*b n d"], solver: str, rank: int | None = None
             ) -> tuple[Float[Array, "*b m"], Float[Array, "*b n m"], Bool[Array, "*b m"]]:
    """(s2, u, resolved): squared singular values (descending), left singular vectors, and whether each
    direction is above the solver's noise floor. m = min(N, D), or rank + oversampling for "randomized"."""
    n, d = x.shape[-2:]
    if solver == "svd":
        if d >= QR_FIRST_RATIO * n:  # X^T = QR gives X = R^T Q^T: X's left singular vectors are R^T's
            x = _t(jnp.linalg.qr(_t(x), mode="r"))
        u, s, _ = jnp.linalg.svd(x, full_matrices=False)
        return s * s, u, s > max(n, d) * _EPS * s[..., :1]
    if solver == "gram":
        w, e = jnp.linalg.eigh(_mm(x, _t(x)) if n <= d else _mm(_t(x), x))
        s2, e = jnp.maximum(w[..., ::-1], 0.0), e[..., ::-1]  # eigh is ascending
        resolved = s2 > min(n, d) * _EPS * s2[..., :1]
        if n <= d:
            return s2, e, resolved
        # e holds right singular vectors: U = X V S^-1, only where S^-1 is meaningful
        inv_s = jnp.where(resolved, lax.rsqrt(jnp.where(resolved, s2, 1.0)), 0.0)
        return s2, _mm(x, e) * inv_s[..., None, :], resolved
    if solver == "randomized":
        m = min(rank + RANDOMIZED_OVERSAMPLE, n, d)
        y = _mm(x, jax.random.normal(jax.random.key(0), (d, m), x.dtype))
        for _ in range(RANDOMIZED_POWER_ITERS):  # orthonormalise between half-steps: float32-safe
            z, _ = jnp.linalg.qr(_mm(_t(x), jnp.linalg.qr(y)[0]))
            y = _mm(x, z)
        q, _ = jnp.linalg.qr(y)
        ub, s, _ = jnp.linalg.svd(_mm(_t(q), x), full_matrices=False)
        return s * s, _mm(q, ub), s > max(n, d) * _EPS * s[..., :1]
    raise ValueError(f"unknown solver {solver!r}; valid: {SOLVERS}")


def _kept_directions(s2: Float[Array, "*b m"], rank, energy) -> Bool[Array, "*b m"]:
    """Static-shape 0/1 mask over singular directions: the first `rank`, or (energy) the first direction
    whose cumulative share of sum(s^2) reaches `energy` and all before it: no dynamic slicing. rank and
    energy may be traced, so new values do not recompile."""
    if energy is None:
        return jnp.arange(s2.shape[-1]) < rank
    before = jnp.cumsum(s2, axis=-1) - s2  # energy held by the directions ahead of j
    # energy 1 is every resolved direction: float32 cumsums cannot see the last ~1e-7 of the energy
    return (before < energy * jnp.sum(s2, axis=-1, keepdims=True)) | (energy >= 1.0)


def _masked(x, mask):
    """x in float32 with the rows `mask` marks invalid set to 0 (None: every row valid). A zero row adds nothing
    to X^T X, so the valid rows' singular vectors and leverage are those of the valid rows alone."""
    x = x.astype(jnp.float32)
    return x if mask is None else jnp.where(mask[..., None], x, 0.0)


def _centred(x, center: bool, mask=None):
    """x (float32), minus the mean of its valid rows when `center`; invalid rows (mask False) stay 0."""
    x = _masked(x, mask)
    if not center:
        return x
    if mask is None:
        return x - x.mean(axis=-2, keepdims=True)
    count = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)[..., None]  # an all-invalid matrix stays 0
    return _masked(x - x.sum(axis=-2, keepdims=True) / count, mask)


def _unit_scale(x):
    """x divided by its largest absolute entry (per matrix): leverage does not depend on the scale, but float32
    squared singular values overflow from |x| ~ 1e18 and underflow below ~1e-19, which left every score 0."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    return x / jnp.where(scale > 0, scale, 1.0)


@functools.partial(jax.jit, static_argnames=("by_energy", "center", "solver", "sketch"))
def _leverage_cut(x, cut, mask, *, by_energy, center, solver, sketch):
    s2, u, resolved = spectrum(_centred(_unit_scale(_masked(x, mask)), center, mask), solver, sketch)
    kept = _kept_directions(s2, None, cut) if by_energy else _kept_directions(s2, cut, None)
    return jnp.einsum("...nm,...m->...n", u * u, (kept & resolved).astype(jnp.float32))


def leverage_unchecked(x, *, rank, energy, center, solver, mask=None):
    """Leverage for checked options (`leverage_options`); the cut is traced, so sweeps do not recompile
    (except "randomized", whose sketch size follows the rank). mask (..., N): only the valid rows form the
    matrix (mean, spectrum); invalid rows score 0."""
    return _leverage_cut(x, energy if rank is None else rank, mask, by_energy=rank is None, center=center,
                         solver=solver, sketch=rank if solver == "randomized" else None)


@functools.partial(jax.jit, static_argnames=("rank", "solver"))
def residual_unchecked(x, mask=None, *, rank, solver):
    """LRCP's residual for checked options; mask as in `leverage_unchecked` (invalid rows score 0)."""
    xc = _centred(x, True, mask)
    _, u, resolved = spectrum(xc, solver, rank)
    ur = u[..., :rank] * resolved[..., None, :rank]
    r = xc - _mm(ur, _mm(_t(ur), xc))  # off the span of the top-r principal directions
    return jnp.sum(r * r, axis=-1)


def leverage_options(n: int, d: int, rank, energy, center, solver) -> dict:
    """Checked, normalised static options of `leverage_scores` ("auto" resolved)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {SOLVERS}")
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank and energy; got rank={rank!r}, energy={energy!r}")
    if not isinstance(center, bool):
        raise ValueError(f"center must be a bool; got {center!r}")
    solver = AUTO_SOLVER if solver == "auto" else solver
    if rank is not None:
        rank = checks.rank(rank, min(n, d))
    else:
        energy = checks.fraction(energy, "energy")
        if solver == "randomized":
            raise ValueError("energy needs the whole spectrum; the randomized solver only finds a rank")
    return dict(rank=rank, energy=energy, center=center, solver=solver)


def leverage_scores(features: Float[Array, "*b n d"], rank: int | None = None, *, energy: float | None = None,
                    center: bool = False, solver: str = "auto") -> Float[Array, "*b n"]:
    """Statistical leverage of each token of `features` (..., N, D): float32 (..., N), computed in float32
    whatever the input dtype. `scores.sum(-1)` is the number of directions used (the rank actually taken).

    Exactly one of:
      rank    int in [1, min(N, D)]: rank-r leverage (traced inside: a rank sweep does not recompile).
              At full rank with N <= D every score is 1 (degenerate), so the rank is the method's real
              hyperparameter. SVD-Prune's method section could not be read here (only its abstract is
              reachable); rank = k (`prune`'s rank="k") is the classic rank-k leverage of column-subset
              selection (Boutsidis-Mahoney-Drineas): the k kept rows scored against the k-dimensional
              subspace they are meant to span.
      energy  fraction eps in (0, 1]: per image, the smallest r whose leading singular values hold eps of
              sum(s^2) (first direction reaching eps kept). Summaries and a third-party reimplementation
              describe SVD-Prune this way (eps = 0.9): the likely reading of the paper, and `prune`'s default
              (centred; `pruning.SVD_DEFAULTS` says what the evidence was). Static 0/1 mask over
              directions, so jit/vmap work and nothing recompiles when r (or eps) changes; eps = 1 keeps
              every resolved direction.
    center: subtract the mean token first (PCA leverage). Default False: the paper decomposes the raw
            vision-token matrix, and so does the reimplementation; centring changes the scores.
    solver: "auto" (= `AUTO_SOLVER`, "svd"), "svd", "gram" or "randomized": see the module docstring.

    Raises ValueError on bad shapes/options and, for concrete inputs, on NaN/inf (see `checks`).
    """
    n, d = checks.features_shape(features)
    opts = leverage_options(n, d, rank, energy, center, solver)
    checks.finite(features, "features")
    return leverage_unchecked(features, **opts)


def lrcp_scores(features: Float[Array, "*b n d"], rank: int = LRCP_RANK, *, solver: str = "auto"
                ) -> Float[Array, "*b n"]:
    """LRCP (arXiv 2605.15621): squared residual of each mean-centred token off the dominant rank-r PCA
    subspace; LRCP keeps the largest (tokens the low-rank background explains worst), the opposite of
    leverage in the top subspace. Float32 (..., N)."""
    n, d = checks.features_shape(features)
    opts = leverage_options(n, d, rank, None, False, solver)
    checks.finite(features, "features")
    return residual_unchecked(features, rank=opts["rank"], solver=opts["solver"])
