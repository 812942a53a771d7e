"""Where the vision tower's time goes: one CLIP ViT-L/14-336 encoder layer (577 tokens, 1024 wide, 16 heads,
MLP 4096; the tower runs 23 of them to LLaVA's layer -2), ours jitted against transformers' CLIPEncoderLayer
on the same weights and input, whole and by part, plus XLA's own account of our compiled layer.

    python -m svdprune_jax.benchmarks.tower_profile [--smoke] [--reps 15] [--out DIR]

By part: the same operation on the same arrays in both (a q/k/v/out projection, fc1 with quick_gelu, fc2, the
attention core softmax(q k^T / sqrt(d)) v over the heads: ours `models.clip.attention`, torch the
scaled_dot_product_attention the HF layer calls, a layer norm), median (min-max) ms of `reps` runs taking
turns after a warm-up; a part's share is its count per layer times its median over the layer's median (parts
timed alone, so the shares need not add up to 100%). Then a jax.profiler trace of our jitted layer: time per
executed XLA kernel, each named by what it computes (read from the optimised HLO). --smoke: a tiny layer,
one run.
Writes DIR/tower_profile.json and .md.
"""
import argparse
import dataclasses
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from svdprune_jax.benchmarks.run import FULL, SMOKE, Preset, hf_model, ours_from, text_config
from svdprune_jax.benchmarks.timing import Stat, interleaved, load
from svdprune_jax.models.clip import attention
from svdprune_jax.models.layers import activation
from svdprune_jax.models.stack import per_layer


def one_layer_preset(base: Preset) -> Preset:
    """`base`'s vision geometry with two layers (layer -2 reads the first) and a tiny decoder."""
    return dataclasses.replace(base, vision={**base.vision, "num_hidden_layers": 2},
                               text=text_config(32, 64, 1, 4, base.image_token_id + 1))


def jitted(module: nnx.Module, fn):
    """fn(module, *args) under jit with the module split outside (params as arguments, as in inference);
    `.hlo(*args)` is the optimised HLO text of that same function."""
    graphdef, state = nnx.split(module)
    f = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
    call = lambda *a: jax.block_until_ready(f(state, *a))
    call.hlo = lambda *a: f.lower(state, *a).compile().as_text()
    return call


def parts(ours, theirs, x: np.ndarray, heads: int) -> dict[str, tuple]:
    """name -> (ours(), torch(), count per layer): each callable runs one part on fixed inputs."""
    n, d = x.shape[1:]
    rng = np.random.default_rng(1)
    xj, xt = jnp.asarray(x), torch.from_numpy(x)
    h = rng.standard_normal((1, n, ours.mlp.fc1.out_features), np.float32)
    hj, ht = jnp.asarray(h), torch.from_numpy(h)
    qkv = [rng.standard_normal((1, n, heads, d // heads), np.float32) for _ in range(3)]
    qkv_j = [jnp.asarray(a) for a in qkv]
    qkv_t = [torch.from_numpy(a).transpose(1, 2).contiguous() for a in qkv]  # (B, H, T, d), as HF passes them
    act = activation(ours.mlp.hidden_act)
    att = jax.jit(lambda q, k, v: attention(q, k, v)[0])
    proj, fc2 = (jitted(m, lambda m, a: m(a)) for m in (ours.self_attn.q_proj, ours.mlp.fc2))
    fc1 = jitted(ours.mlp.fc1, lambda m, a: act(m(a)))
    norm = jitted(ours.layer_norm1, lambda m, a: m(a))
    t_mlp, t_attn = theirs.mlp, theirs.self_attn
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "q/k/v/out projection": (lambda: proj(xj), lambda: t_attn.q_proj(xt), 4),
        "fc1 + activation": (lambda: fc1(xj), lambda: t_mlp.activation_fn(t_mlp.fc1(xt)), 1),
        "fc2": (lambda: fc2(hj), lambda: t_mlp.fc2(ht), 1),
        "attention core": (lambda: jax.block_until_ready(att(*qkv_j)), lambda: sdpa(*qkv_t, scale=t_attn.scale), 1),
        "layer norm": (lambda: norm(xj), lambda: theirs.layer_norm1(xt), 2),
    }


def kernel_profile(layer_fn, compiled_hlo: str, reps: int) -> list[dict]:
    """Mean ms per call of each XLA kernel of our layer from a jax.profiler trace, with what it computes."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(reps):
            layer_fn()
        jax.profiler.stop_trace()
        (trace,) = Path(d).glob("plugins/profile/*/perfetto_trace.json.gz")
        events = json.load(gzip.open(trace))["traceEvents"]
    fusions = re.findall(r"^\s*%?([\w.\-]+) = (\S+) fusion\(.*?calls=%?([\w.\-]+)", compiled_hlo, re.M)
    kernels = {name: shape for name, shape, _ in fusions}
    calls = {name: body for name, _, body in fusions}
    total: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e["name"] in kernels:
            total[e["name"]] = total.get(e["name"], 0.0) + e["dur"] / 1e3 / reps
    rows = []
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1]):
        body = re.search(r"^%?" + re.escape(calls.get(name, "?")) + r" .*?\{(.*?)^\}", compiled_hlo, re.M | re.S)
        ops = sorted(set(re.findall(r"= \S+ (\w+)\(", body.group(1)))) if body else []
        ops = [o for o in ops if o not in ("parameter", "bitcast", "broadcast", "constant")]
        rows.append(dict(kernel=name, ms=ms, output=kernels[name], ops=ops, what=_what(ops, kernels[name])))
    return rows


def _what(ops: list[str], shape: str) -> str:
    if "dot" in ops and "exponential" in ops:
        return "attention core (both products and the softmax, one fused kernel)"
    if "dot" in ops:
        return f"GEMM -> {shape}"
    if "convolution" in ops:
        return "patch embedding"
    return "elementwise / reduce (" + ", ".join(ops) + ")"


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    preset = one_layer_preset(SMOKE if args.smoke else FULL)
    reps = args.reps or (1 if args.smoke else 15)
    hf = hf_model(preset)
    model = per_layer(ours_from(hf))
    ours, theirs = model.vision_tower.layers[0], hf.model.vision_tower.encoder.layers[0]
    v = preset.vision
    n = (v["image_size"] // v["patch_size"]) ** 2 + 1
    x = np.random.default_rng(0).standard_normal((1, n, v["hidden_size"]), np.float32)
    layer = jitted(ours, lambda m, a: m(a)[0])
    xj, xt = jnp.asarray(x), torch.from_numpy(x)
    with torch.inference_mode():
        diff = float(np.abs(np.asarray(layer(xj)) - theirs(xt, None).numpy()).max())
        fns = {"layer": (lambda: layer(xj), lambda: theirs(xt, None), 1), **parts(ours, theirs, x, v["num_attention_heads"])}
        stats = interleaved({f"{k}/{side}": (lambda r, f=f: f()) for k, pair in fns.items()
                             for side, f in zip(("ours", "torch"), pair[:2])}, reps)
    kernels = kernel_profile(lambda: layer(xj), layer.hlo(xj), reps)
    counts = {k: pair[2] for k, pair in fns.items()}
    report = dict(geometry=f"{n} tokens x {v['hidden_size']}, {v['num_attention_heads']} heads, MLP {v['intermediate_size']}",
                  load=load(), torch_threads=torch.get_num_threads(), max_abs_diff_layer=diff,
                  parts={k: {s: stats[f"{k}/{s}"].json() for s in ("ours", "torch")} | {"per_layer": counts[k]} for k in fns},
                  kernels=kernels)
    md = markdown(report, stats, counts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tower_profile.json").write_text(json.dumps(report, indent=1))
    (args.out / "tower_profile.md").write_text(md)
    print(md)


def markdown(report: dict, stats: dict[str, Stat], counts: dict[str, int]) -> str:
    med = lambda k, s: stats[f"{k}/{s}"].median * 1e3
    ours_layer = med("layer", "ours")
    lines = [f"One CLIP encoder layer, {report['geometry']}; load {report['load']}; torch threads "
             f"{report['torch_threads']}; max |ours - torch| {report['max_abs_diff_layer']:.1e}", "",
             "| part | x per layer | ours ms | torch ms | ours / torch | share of our layer |", "|---|---|---|---|---|---|"]
    for k, c in counts.items():
        o, t = med(k, "ours"), med(k, "torch")
        span = lambda side: f"{stats[f'{k}/{side}'].lo * 1e3:.1f}-{stats[f'{k}/{side}'].hi * 1e3:.1f}"
        share = "" if k == "layer" else f"{c * o / ours_layer:.0%}"
        lines.append(f"| {k} | {c} | {o:.1f} ({span('ours')}) | {t:.1f} ({span('torch')}) | {o / t:.2f} | {share} |")
    lines += ["", "XLA kernels of our layer (jax.profiler trace, mean ms per call):", "",
              "| kernel | ms | computes |", "|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['ms']:.2f} | {r['what']} |" for r in report["kernels"][:16]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
