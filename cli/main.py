"""`svdprune-jax`: run | convert | export | eval | bench | train. Thin: parse, call the rooms, print, draw.

Each command imports only what it needs (`--help` loads no JAX). `eval`, `bench` and `train` own their
parsers (`svdprune-jax eval --help`); the options before the command are the multi-host ones.
"""
import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from svdprune_jax import names
from svdprune_jax.cli import outputs, runtime

PAPER_FRACTION = 64 / 576  # the paper's 64-of-576 budget, as a share of any model's image tokens
MESH_HELP = ("run sharded on a device mesh: data=D,model=M with D*M = every device of every process; the batch "
             "splits over data, heads and MLP over model (default: one device)")
# commands whose module parses its own arguments: (module, help)
DELEGATED = {
    "eval": ("svdprune_jax.cli.evaluate", "accuracy of every method x budget (synthetic, gqa, textvqa)"),
    "bench": ("svdprune_jax.benchmarks", "speed, ours vs transformers PyTorch (needs torch)"),
    "train": ("svdprune_jax.synthetic.train", "train the bundled tiny LLaVA (hours on a CPU)"),
}
GLOBAL_VALUES = ("--coordinator", "--num-processes", "--process-id")  # global options that take a value


def run(args):
    import json
    import time

    from svdprune_jax.inference.images import read_image
    from svdprune_jax.inference.methods import parse
    from svdprune_jax.inference.pictures import CropGeometry, kept_overlay
    from svdprune_jax.inference.pipeline import METHODS, Pipeline
    from svdprune_jax.models import sharding
    from svdprune_jax.synthetic import bundled

    model_dir = args.model or bundled.MODEL_DIR
    if args.model is None and not (bundled.MODEL_DIR / "config.json").is_file():
        raise ValueError(f"the bundled model is not installed ({bundled.MODEL_DIR}): reinstall svdprune-jax or "
                         "pass --model DIR (an HF LLaVA directory or our checkpoint)")
    spec = parse(args.method, METHODS)
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: give a question, or leave --prompt out for the bundled example's")
    # the picture's path, checked before any work (its default name holds the budget, known once the model is)
    if args.out is not None:
        outputs.check_file(args.out, "--out")
    else:
        outputs.check_dir(Path.cwd(), "the working directory (the kept-token picture's default place; or --out)")
    example = bundled.example()
    question = args.prompt if args.prompt is not None else example["question"]
    # the bundled example's right answer, shown beside the model's so a wrong pruned answer is visible
    truth = example["answer"] if args.image is None and args.prompt is None else None
    image = read_image(args.image or bundled.EXAMPLE_IMAGE)
    t = time.perf_counter()
    pipe = Pipeline.load(model_dir, mesh=sharding.mesh_option(args.mesh))
    load_s = time.perf_counter() - t
    keep = args.keep
    if keep is None and spec.method != "full":
        keep = max(1, round(PAPER_FRACTION * pipe.num_image_tokens))
    if spec.adaptive is not None:  # the image's own budget, at most keep
        keep, spec = int(pipe.adaptive_keep([image], spec, keep)[0]), spec.fixed()
    (ans,), timings, seconds, first_s = timed_answer(pipe, image, question, spec, keep, args.max_new_tokens)
    # the unpruned answer and time beside the pruned ones, so a pruned answer and its saving are easy to judge
    full = None if spec.method == "full" else timed_answer(pipe, image, question, "full", None, args.max_new_tokens)
    n = int(pipe.image_token_counts([image])[0])
    kept = pipe.budget(spec, keep)
    vis = pipe.config.vision
    # FastV drops tokens inside the language model: every patch reaches its first layers. LLaVA-NeXT's kept tokens
    # span several views of different scales: no picture yet.
    overlay = None
    if spec.method != "fastv" and not pipe.is_next:
        overlay = args.out or Path(f"kept_tokens_{args.method}_{kept}.png")
        kept_overlay(image, ans.kept_indices, vis.image_size, vis.patch_size,
                     geometry=CropGeometry.of(pipe.processor)).save(overlay)
    if args.json:
        print(json.dumps(dict(answer=ans.text, token_ids=ans.token_ids, prompt_ids=ans.prompt_ids,
                              kept_indices=ans.kept_indices, keep=kept, method=args.method, seconds=seconds,
                              image_tokens=n, stage_seconds=timings, compile_seconds=first_s - seconds,
                              unpruned_answer=None if full is None else full[0][0].text,
                              unpruned_seconds=None if full is None else full[2],
                              overlay=None if overlay is None else str(overlay), model=str(model_dir),
                              question=question, truth=truth)))
        return
    print(f"model     {model_dir}  (loaded in {load_s:.1f} s)")
    print(f"question  {question}")
    print(f"answer    {ans.text}" + (f"  (right answer: {truth})" if truth is not None else ""))
    if full is not None:
        print(f"unpruned  {full[0][0].text}  (all {n} image tokens)")
    print(f"kept      {kept} of {n} image tokens ({args.method})")
    stages = "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timings.items())
    print(f"time      {seconds * 1e3:.1f} ms  ({stages}; first call incl. compile {first_s:.1f} s)")
    if full is not None:
        print(f"saved     {(full[2] - seconds) * 1e3:.1f} ms of {full[2] * 1e3:.1f} ms unpruned "
              f"({1 - seconds / full[2]:.0%})")
    print("picture   " + (str(overlay) if overlay is not None else
                          "none: fastv keeps every patch for its first layers, then prunes by the question's attention"
                          if spec.method == "fastv" else "none: LLaVA-NeXT's kept tokens span views of several scales"))


def timed_answer(pipe, image, question: str, method, keep: int | None, max_new_tokens: int):
    """(answers, stage timings, seconds) of a second call, after a first that compiles (or reads the compilation
    cache), and the first call's seconds."""
    import time

    kw = dict(method=method, keep=keep, max_new_tokens=max_new_tokens, timed=True)
    t = time.perf_counter()
    pipe.answer([image], [question], **kw)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    answers, timings = pipe.answer([image], [question], **kw)
    return answers, timings, time.perf_counter() - t, first_s


def convert(args):
    from svdprune_jax.convert import convert_checkpoint
    outputs.check_dir(args.out_dir, "convert's output")
    print(convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, progress=True))


def export(args):
    from svdprune_jax.convert import export_checkpoint
    outputs.check_dir(args.hf_dir, "export's output")
    files = export_checkpoint(args.our_dir, args.hf_dir, max_shard_bytes=args.max_shard_bytes, progress=True)
    print(f"wrote {len(files)} weight file(s) to {args.hf_dir}")


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdprune-jax", description="SVD-Prune vision-token pruning for LLaVA in JAX",
                                epilog=f"{runtime.CACHE_ENV}=off turns the persistent compilation cache off "
                                       f"(default: {runtime.default_cache_dir()})")
    d = p.add_argument_group("multi-host (before the command; every process runs the same command line)")
    d.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with the cluster auto-detected (Cloud TPU, SLURM, Open MPI)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="or explicitly: process 0's address")
    d.add_argument("--num-processes", type=int)
    d.add_argument("--process-id", type=int)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,convert,export,eval,bench,train}")

    r = sub.add_parser("run", help="answer a question about an image with pruned inference (default: bundled model)")
    r.add_argument("--model", type=Path, help="HF LLaVA / LLaVA-NeXT directory or our converted checkpoint (default: bundled)")
    r.add_argument("--image", type=Path, help="image file; non-RGB modes are converted (default: the bundled example)")
    r.add_argument("--prompt", help="the question (default: the bundled image's question)")
    r.add_argument("--keep", type=int, help="image tokens kept (default: 64/576 of the model's image tokens)")
    r.add_argument("--method", default="svd", help="a method spec, e.g. svd:energy=0.9 (svdprune_jax.inference."
                   f"methods); methods: {', '.join(names.ANSWER_METHODS)}")
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
    e.add_argument("--max-shard-bytes", type=positive_int, help="shard the safetensors at this size")
    e.set_defaults(fn=export)

    for name, (_, help_) in DELEGATED.items():  # listed here; their own parsers take the rest of the line
        sub.add_parser(name, help=help_, add_help=False)
    return p


def command_index(argv: Sequence[str]) -> int | None:
    """Where the command stands in argv, after the global options (None: no command)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in GLOBAL_VALUES else 1
    return i if i < len(argv) else None


def initialize_distributed(args):
    """Join a multi-process run before anything touches a device: afterwards jax.devices() lists every
    process's devices and a --mesh spans them all."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.distributed or explicit[0] is not None:
        import jax
        jax.distributed.initialize(*explicit)


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime.set_defaults()
    runtime.catch_signals()
    runtime.handle_unraisable_reports()
    at = command_index(argv)
    delegated = at is not None and argv[at] in DELEGATED
    args = parser().parse_args(argv[:at + 1] if delegated else argv)
    try:
        initialize_distributed(args)
        runtime.enable_compilation_cache()
        if delegated:
            module = importlib.import_module(DELEGATED[args.command][0])
            return module.main(argv[at + 1:], prog=f"svdprune-jax {args.command}")
        return args.fn(args)
    except runtime.EXPECTED as e:  # bad input or an unusable file: one clear line, no traceback
        if runtime.interrupted():  # a library turned the interrupt into its own error
            sys.exit(f"svdprune-jax {args.command}: interrupted")
        sys.exit(f"svdprune-jax {args.command}: error: {runtime.describe(e)}")
    except KeyboardInterrupt:
        sys.exit(f"svdprune-jax {args.command}: interrupted")
    except Exception:
        if runtime.interrupted():  # e.g. a thread pool's "cannot schedule new futures" after Ctrl-C
            sys.exit(f"svdprune-jax {args.command}: interrupted")
        raise


if __name__ == "__main__":
    main()
