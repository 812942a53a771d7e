"""`svdprune-jax`: run | convert | export | eval | bench | train. Thin: parse, call the rooms, print, draw."""
import argparse
import json
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLE_IMAGE = ASSETS / "example.png"
PAPER_FRACTION = 64 / 576  # the paper's 64-of-576 budget, as a share of any model's image tokens
MESH_HELP = ("run sharded on a device mesh: data=D,model=M with D*M = every device of every process; the batch "
             "splits over data, heads and MLP over model (default: one device)")


def run(args):
    from app.bundled import MODEL_DIR
    from app.methods import parse
    from app.pictures import kept_overlay
    from app.pipeline import METHODS, Pipeline, read_image
    from models import sharding

    example = json.loads((ASSETS / "example.json").read_text())
    model_dir = args.model or MODEL_DIR
    if args.model is None and not (MODEL_DIR / "config.json").is_file():
        raise ValueError(f"the bundled model is not in this checkout ({MODEL_DIR}): train it (`svdprune-jax "
                         "train`, see the README) or pass --model DIR (an HF LLaVA directory or our checkpoint)")
    spec = parse(args.method, METHODS)
    question = args.prompt or example["question"]
    # the bundled example's right answer, shown beside the model's so a wrong pruned answer is visible
    truth = example["answer"] if args.image is None and args.prompt is None else None
    image = read_image(args.image or EXAMPLE_IMAGE)
    t = time.perf_counter()
    pipe = Pipeline.load(model_dir, mesh=sharding.mesh_option(args.mesh))
    load_s = time.perf_counter() - t
    keep = args.keep
    if keep is None and spec.method != "full":
        keep = max(1, round(PAPER_FRACTION * pipe.num_image_tokens))
    if spec.adaptive is not None:  # the image's own budget, at most keep
        keep, spec = int(pipe.adaptive_keep([image], spec, keep)[0]), spec.fixed()
    kw = dict(method=spec, keep=keep, max_new_tokens=args.max_new_tokens, timed=True)
    t = time.perf_counter()
    pipe.answer([image], [question], **kw)  # first call: compiles
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    (ans,), timings = pipe.answer([image], [question], **kw)
    seconds = time.perf_counter() - t
    n = pipe.num_image_tokens
    kept = pipe.budget(spec, keep)
    overlay = args.out or Path(f"kept_tokens_{args.method}_{kept}.png")
    vis = pipe.config.vision
    kept_overlay(image, ans.kept_indices, vis.image_size, vis.patch_size).save(overlay)
    if args.json:
        print(json.dumps(dict(answer=ans.text, token_ids=ans.token_ids, prompt_ids=ans.prompt_ids,
                              kept_indices=ans.kept_indices, keep=kept, method=args.method, seconds=seconds,
                              image_tokens=n, stage_seconds=timings, compile_seconds=first_s - seconds,
                              overlay=str(overlay), model=str(model_dir), question=question, truth=truth)))
        return
    print(f"model     {model_dir}  (loaded in {load_s:.1f} s)")
    print(f"question  {question}")
    print(f"answer    {ans.text}" + (f"  (right answer: {truth})" if truth is not None else ""))
    print(f"kept      {kept} of {n} image tokens ({args.method})")
    stages = "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timings.items())
    print(f"time      {seconds * 1e3:.1f} ms  ({stages}; first call incl. compile {first_s:.1f} s)")
    print(f"picture   {overlay}")


def convert(args):
    from convert import convert_checkpoint
    print(convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, progress=True))


def export(args):
    from convert import export_checkpoint
    files = export_checkpoint(args.our_dir, args.hf_dir, max_shard_bytes=args.max_shard_bytes, progress=True)
    print(f"wrote {len(files)} weight file(s) to {args.hf_dir}")


def parser() -> argparse.ArgumentParser:
    from app.pipeline import METHODS

    p = argparse.ArgumentParser(prog="svdprune-jax", description="SVD-Prune vision-token pruning for LLaVA in JAX")
    d = p.add_argument_group("multi-host (before the command; every process runs the same command line)")
    d.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with the cluster auto-detected (Cloud TPU, SLURM, Open MPI)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="or explicitly: process 0's address")
    d.add_argument("--num-processes", type=int)
    d.add_argument("--process-id", type=int)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="answer a question about an image with pruned inference (default: bundled model)")
    r.add_argument("--model", type=Path, help="HF LLaVA directory or our converted checkpoint (default: bundled)")
    r.add_argument("--image", type=Path, help=f"RGB image (default: {EXAMPLE_IMAGE.name})")
    r.add_argument("--prompt", help="the question (default: the bundled image's question)")
    r.add_argument("--keep", type=int, help="image tokens kept (default: 64/576 of the model's image tokens)")
    r.add_argument("--method", default="svd", help=f"a method spec, e.g. svd:energy=0.9 (app/methods.py); methods: "
                   f"{', '.join(METHODS)} (default svd)")
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--out", type=Path, help="PNG of the kept tokens (default: kept_tokens_METHOD_K.png)")
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    r.add_argument("--mesh", help=MESH_HELP)
    r.set_defaults(fn=run)

    c = sub.add_parser("convert", help="HF LLaVA directory -> our Orbax checkpoint")
    c.add_argument("hf_dir", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--dtype", help="float32 or bfloat16 (bf16); default: the checkpoint's own")
    c.set_defaults(fn=convert)

    e = sub.add_parser("export", help="our checkpoint -> transformers-loadable HF LLaVA directory")
    e.add_argument("our_dir", type=Path)
    e.add_argument("hf_dir", type=Path)
    e.add_argument("--max-shard-bytes", type=int, help="shard the safetensors at this size")
    e.set_defaults(fn=export)

    for name, target, help_ in (("eval", "app.evaluate", "accuracy of every method x budget (synthetic, gqa, textvqa)"),
                                ("bench", "benchmarks.run", "speed, ours vs transformers PyTorch"),
                                ("train", "app.train", "train the bundled tiny LLaVA")):
        s = sub.add_parser(name, help=help_, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(fn=lambda a, target=target: __import__(target, fromlist=["main"]).main(a.rest))
    return p


def initialize_distributed(args):
    """Join a multi-process run before anything touches a device: afterwards jax.devices() lists every
    process's devices and a --mesh spans them all."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.distributed or explicit[0] is not None:
        import jax
        jax.distributed.initialize(*explicit)


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    try:
        initialize_distributed(args)
        args.fn(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        sys.exit(f"svdprune-jax {args.command}: error: {e}")


if __name__ == "__main__":
    main()
