"""Peak memory and speed of checkpoint conversion on a LLaVA-1.5-7B-shaped checkpoint of a few GB.

Builds (once, kept in --workdir) a float16 checkpoint with llava-1.5-7b-hf's geometry (full CLIP ViT-L/14-336
tower, 4096-wide Vicuna decoder, 32064-word vocabulary) but only --text-layers decoder layers, random finite
weights, written as hub-layout shards with the safetensors library. Then, each in a fresh subprocess,
`convert_checkpoint` (HF -> ours) and `export_checkpoint` (ours -> HF) run, and the report gives the child's
peak RSS (ru_maxrss, the interpreter and jax included) against the size of our params in the target dtype,
and the speed in GB of source tensors per second. The source files are in the page cache (just written).

    python benchmarks/convert_memory.py [--dtype bf16] [--text-layers 4] [--workdir /tmp/convert-bench]
"""
import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy
from flax import traverse_util

from svdprune_jax.convert import keymap
from svdprune_jax.convert.checkpoint import TARGET_DTYPES, abstract_model, abstract_params, dtype_name
from svdprune_jax.convert.hf_config import write_config
from svdprune_jax.convert.safetensors_io import INDEX, read_checkpoint
from svdprune_jax.models.llava import LLAVA_15_7B

SHARD_BYTES = 2**30


def hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint (hub layout) for `cfg`, the whole vision tower and post_layernorm
    included as in a real checkpoint: our full-depth param shapes taken back through the key table."""
    full = dataclasses.replace(cfg, vision_feature_layer=-1)
    shapes = {}
    for path, a in traverse_util.flatten_dict(abstract_params(abstract_model(full, "bfloat16"))).items():
        rule = keymap.BY_PATH[path]
        hf_shape = rule.transform.to_hf(np.broadcast_to(np.empty((), np.bool_), a.shape[rule.stacked:])).shape
        for i in range(a.shape[0]) if rule.stacked else [None]:
            shapes[rule.hf_key(i)] = hf_shape
    for rule in keymap.RULES:
        if rule.ours is None:  # post_layernorm: the shape of pre_layrnorm's
            shapes[rule.hf_key()] = (cfg.vision.hidden_size,)
    return shapes


def build(directory: Path, cfg, seed: int = 0):
    """Random float16 weights, |w| < 2 (exponent's top bit cleared), in ~1 GiB shards plus the index."""
    directory.mkdir(parents=True)
    rng, shapes = np.random.default_rng(seed), hf_shapes(cfg)
    shards, size = [[]], 0
    for key, shape in shapes.items():
        if shards[-1] and size + 2 * math.prod(shape) > SHARD_BYTES:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += 2 * math.prod(shape)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        tensors = {k: (rng.integers(0, 1 << 16, shapes[k], dtype=np.uint16) & 0xBFFF).view(np.float16) for k in keys}
        safetensors.numpy.save_file(tensors, directory / name, metadata={"format": "pt"})
    weight_map = {k: n for n, keys in zip(names, shards) for k in keys}
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_config(directory, cfg, "float16")


def measure(statement: str) -> dict:
    """Run `statement` in a fresh interpreter after the imports: wall and CPU seconds (the machine may be
    shared, so GB per CPU-second is the figure that does not depend on its load), peak RSS in bytes."""
    child = f"""
import json, resource, time
import svdprune_jax.convert as convert
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
base, cpu0 = rss(), sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t = time.perf_counter()
{statement}
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(seconds=time.perf_counter() - t, cpu=u.ru_utime + u.ru_stime - cpu0, base=base,
                      peak=u.ru_maxrss * 1024)))
"""
    out = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    args = p.parse_args()
    dtype = dtype_name(args.dtype)
    text = dataclasses.replace(LLAVA_15_7B.text, num_hidden_layers=args.text_layers)
    cfg = dataclasses.replace(LLAVA_15_7B, text=text)
    src, ours, back = (args.workdir / f"{n}-{args.text_layers}" for n in ("hf", f"ours-{dtype}", f"back-{dtype}"))
    if not src.exists():
        build(src, cfg)
    shutil.rmtree(ours, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)
    source = sum(t.nbytes for t in read_checkpoint(src).values())
    target = sum(math.prod(a.shape) for a in traverse_util.flatten_dict(
        abstract_params(abstract_model(cfg, dtype))).values()) * TARGET_DTYPES[dtype].itemsize
    print(f"checkpoint: {source / 1e9:.2f} GB float16 ({args.text_layers} decoder layers); "
          f"our params in {dtype}: {target / 1e9:.2f} GB")
    for name, statement in [("convert", f"convert.convert_checkpoint({str(src)!r}, {str(ours)!r}, dtype={dtype!r}, "
                                        "progress=False)"),
                            ("export", f"convert.export_checkpoint({str(ours)!r}, {str(back)!r}, "
                                       f"max_shard_bytes={SHARD_BYTES}, progress=False)")]:
        m = measure(statement)
        nbytes, what = (source, "float16 read") if name == "convert" else (target, f"{dtype} written")
        print(f"{name}: {m['seconds']:.1f} s, {nbytes / m['seconds'] / 1e9:.2f} GB/s ({what}; "
              f"{nbytes / m['cpu'] / 1e9:.2f} GB per CPU-second); peak RSS "
              f"{m['peak'] / 1e9:.2f} GB = {m['peak'] / target:.2f}x the {dtype} params "
              f"(after imports {m['base'] / 1e9:.2f} GB; conversion itself {(m['peak'] - m['base']) / target:.2f}x)")


if __name__ == "__main__":
    main()
