"""`svdprune-jax eval synthetic|gqa|textvqa ...`: accuracy of pruning methods x budgets.

  synthetic       the bundled benchmark's test split, every method and budget (see `svdprune_jax.synthetic.benchmark`)
  gqa, textvqa    the paper's benchmarks, from their official files or LLaVA's eval bundle (layouts in
                  `svdprune_jax.evaluation.vqa_data`), through the resumable harness (`svdprune_jax.evaluation.harness`)
                  with LLaVA-1.5's evaluation protocol (`svdprune_jax.evaluation.protocol`) and greedy decoding

    svdprune-jax eval gqa --data DIR --model DIR [--methods svd,fastv] [--keep 64,32,16] [--out DIR] [--strict]

Images that are not RGB (real datasets hold a few, e.g. grayscale JPEGs) are converted, as LLaVA's own
evaluation converts every image, with a warning naming the file (once per run); `--no-convert-rgb` refuses them.
Mean time per sample excludes compilation: every run that still has questions to answer is compiled on one
batch before the harness starts its clock.

`--mesh data=D,model=M` runs sharded; on several processes (`svdprune-jax --distributed eval ...` on each) the
data axis spans them, so every batch is split across processes, each answering its own rows; the answers are
gathered and only process 0 writes (--out must be one directory all processes see).
"""
import argparse
import csv
import dataclasses
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax

from svdprune_jax.cli import outputs
from svdprune_jax.evaluation import harness as eval_harness
from svdprune_jax.synthetic import benchmark as eval_synthetic
from svdprune_jax.evaluation import vqa_data
from svdprune_jax.evaluation.protocol import PROTOCOLS, Protocol
from svdprune_jax.synthetic.bundled import MODEL_DIR
from svdprune_jax.inference.methods import parse_list
from svdprune_jax.inference.pictures import accuracy_plot
from svdprune_jax.inference.images import read_image
from svdprune_jax.inference.pipeline import CHAT_TEMPLATE, METHODS, Pipeline, check_template
from svdprune_jax.evaluation.stats import RESAMPLES
from svdprune_jax.models import sharding

BENCHMARKS = ("synthetic", *vqa_data.LAYOUTS)
VQA_METHODS = tuple(m for m in METHODS if m != eval_harness.BASELINE[0])  # the harness's baseline, always run


def vqa_predict(pipe: Pipeline, protocol: Protocol, *, batch: int, max_new_tokens: int, convert_rgb: bool,
                template: str | None = None) -> eval_harness.Predict:
    """The harness's predict: images and user texts as `protocol` makes them, its conversation (or `template`),
    greedy answers, batches filled up to `batch` rows by repeating questions (their answers dropped) so that one
    compiled shape serves a run."""
    template = template or protocol.template

    def predict(samples: Sequence[vqa_data.Sample], method: str, budget: int | None) -> list[str]:
        images = [protocol.image(read_image(s.image, convert=convert_rgb), pipe.processor.image_mean) for s in samples]
        texts = [protocol.user_text(s.question, s.ocr) for s in samples]
        rows = [i % len(samples) for i in range(max(batch, len(samples)))]
        key = jax.random.key(zlib.crc32(samples[0].qid.encode()))  # random pruning: fixed by the batch
        answers, _ = pipe.answer([images[i] for i in rows], [texts[i] for i in rows],
                                 method=method, keep=budget, max_new_tokens=max_new_tokens,
                                 template=template, key=key)
        return [a.text for a in answers[:len(samples)]]
    return predict


def warm_up(dataset: vqa_data.Dataset, predict: eval_harness.Predict, runs, out_dir: Path, batch: int) -> None:
    """Compiles every run that still has questions to answer, so the harness's timings exclude compilation."""
    for method, budget in [eval_harness.BASELINE, *runs]:
        done = eval_harness.read_results(eval_harness.results_path(out_dir, method, budget))
        if any(s.qid not in done for s in dataset.samples):
            predict(dataset.samples[:batch], method, budget)


def vqa_main(name: str, argv: Sequence[str]) -> list[eval_harness.Row]:
    p = argparse.ArgumentParser(prog=f"svdprune-jax eval {name}",
                                description=f"{name}: accuracy of every method x budget, resumable")
    layouts = vqa_data.LAYOUTS[name]
    p.add_argument("--data", type=Path, required=True,
                   help="directory with " + " or ".join(f"{q} and {i}/ ({k})" for k, (q, i) in layouts.items()))
    p.add_argument("--model", type=Path, required=True, help="HF LLaVA directory or our converted checkpoint")
    p.add_argument("--methods", nargs="+", default=list(VQA_METHODS),
                   help=f"method specs (svdprune_jax.inference.methods, e.g. svd:energy=0.9), methods from {', '.join(VQA_METHODS)}")
    p.add_argument("--keep", nargs="+", default=["64", "32", "16"], help="image tokens kept (default 64,32,16)")
    p.add_argument("--out", type=Path, default=None, help=f"results directory (default eval/{name})")
    p.add_argument("--strict", action="store_true", help="fail on bad entries instead of skipping them")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--convert-rgb", action=argparse.BooleanOptionalAction, default=True,
                   help="convert non-RGB images with a warning (default), or refuse them")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="llava15",
                   help="llava15: LLaVA-1.5's eval (pad to square, vicuna_v1 system line, TextVQA OCR tokens); "
                        "plain: none of them (default llava15); the options below change one part")
    p.add_argument("--pad-square", action=argparse.BooleanOptionalAction, default=None,
                   help="pad the image to a square of the processor's mean colour before the processor")
    p.add_argument("--system", action=argparse.BooleanOptionalAction, default=None,
                   help="vicuna_v1's system line before the conversation")
    p.add_argument("--ocr", action=argparse.BooleanOptionalAction, default=None,
                   help="TextVQA: the 'Reference OCR token:' line after the question")
    p.add_argument("--instruction", action=argparse.BooleanOptionalAction, default=None,
                   help="LLaVA's short-answer instruction after the question")
    p.add_argument("--prompt-template", default=None,
                   help="replaces the protocol's conversation: one <image> and {question} (the user text, ending "
                        f"in LLaVA's instruction); the bundled model was trained on {CHAT_TEMPLATE!r}")
    p.add_argument("--mesh", help="data=D,model=M: run sharded (--batch a multiple of D); default one device")
    args = p.parse_args(argv)
    parts = ("pad_square", "system", "ocr", "instruction")
    protocol = dataclasses.replace(PROTOCOLS[args.protocol],
                                   **{k: getattr(args, k) for k in parts if getattr(args, k) is not None})
    template = args.prompt_template or protocol.template
    check_template(template)  # before any work; `Pipeline.prompt_ids` checks it on every use
    specs = parse_list(args.methods, VQA_METHODS)
    adaptive = [s.text for s in specs if s.adaptive is not None]
    if adaptive:
        raise ValueError(f"adaptive budgets {adaptive} are measured by `eval synthetic`; this harness runs fixed ones")
    methods = [s.text for s in specs]
    try:
        keeps = [int(k) for k in items(args.keep)]
    except ValueError:
        raise ValueError(f"--keep takes token counts, got {args.keep}") from None
    if args.batch < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError(f"--batch {args.batch} and --limit {args.limit} must be >= 1")
    mesh = sharding.mesh_option(args.mesh)
    if mesh is not None:
        sharding.check_batch(args.batch, mesh)
    out = args.out or Path("eval") / name
    outputs.check_dir(out, "--out")
    dataset = vqa_data.load(name, args.data, strict=args.strict)
    if args.limit is not None:
        dataset = vqa_data.Dataset(name, dataset.samples[:args.limit], dataset.skipped)
    if name == "textvqa" and protocol.ocr and not any(s.ocr for s in dataset.samples):
        raise ValueError(f"textvqa: {args.data} has no OCR tokens (LLaVA's llava_textvqa_val_v051_ocr.jsonl, or "
                         f"{vqa_data.ROSETTA_OCR}); pass --no-ocr to evaluate without them")
    questions = args.data / vqa_data.LAYOUTS[name][vqa_data.detect(name, args.data)][0]
    settings = dict(data=str(args.data.resolve()), questions_sha256=vqa_data.fingerprint(questions),
                    model=str(args.model.resolve()),
                    weights=eval_harness.weights_fingerprint(args.model), prompt_template=template, pad_square=protocol.pad_square,
                    ocr=protocol.ocr, instruction=protocol.instruction, max_new_tokens=args.max_new_tokens,
                    convert_rgb=args.convert_rgb)
    if out.is_dir():  # refused before the model loads
        eval_harness.check_settings(out, settings)
    pipe = Pipeline.load(args.model, mesh=mesh)
    for method in methods:
        for k in keeps:
            pipe.budget(method, k)  # bad budgets fail before any work
    runs = [(m, k) for m in methods for k in keeps]
    predict = vqa_predict(pipe, protocol, batch=args.batch, max_new_tokens=args.max_new_tokens,
                          convert_rgb=args.convert_rgb, template=template)
    out.mkdir(parents=True, exist_ok=True)
    eval_harness.check_settings(out, settings)
    warm_up(dataset, predict, runs, out, args.batch)
    write = jax.process_index() == 0
    rows = eval_harness.evaluate(dataset, predict, runs, out, batch_size=args.batch, write=write)
    if not write:
        return rows
    accuracy_plot([dict(method=r.method, keep=r.budget or pipe.num_image_tokens, accuracy=r.accuracy_pct)
                   for r in rows], out / "summary.png", f"{name}, n={len(dataset.samples)}")
    print(f"wrote {out}/summary.csv, summary.png")
    if name == "pope":
        write_pope_table(eval_harness.split_metrics(dataset, [eval_harness.BASELINE, *runs], out), out / "pope.csv")
    return rows


def write_pope_table(rows: list[dict], path: Path) -> None:
    """POPE's per-split table: printed, and as CSV."""
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    print(f"{'method':<16}{'budget':>8}{'split':>13}" + "".join(f"{k:>11}" for k in keys))
    for r in rows:
        print(f"{r['method']:<16}{r['budget']:>8}{r['split']:>13}" + "".join(f"{r[k]:>11.2f}" for k in keys))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def synthetic_main(argv: Sequence[str]) -> list[dict]:
    methods, budgets = eval_synthetic.METHODS, eval_synthetic.BUDGETS
    p = argparse.ArgumentParser(prog="svdprune-jax eval synthetic",
                                description=eval_synthetic.__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR, help="LLaVA directory (default: the bundled model)")
    p.add_argument("--n", type=int, default=500, help="questions (default 500)")
    p.add_argument("--split", choices=("validation", "test"), default="test",
                   help="choose hyperparameters on validation; read test once per final configuration")
    p.add_argument("--methods", nargs="+", default=list(methods),
                   help=f"method specs (svdprune_jax.inference.methods), e.g. svd,svd:rank=k,lrcp:r=4,svd:adaptive=0.9,"
                        f"svd:matrix=projector; methods from {', '.join(methods)} (default: each plain method)")
    p.add_argument("--budgets", nargs="+", default=list(budgets),
                   help="shares of the image tokens (50%%, 64/576) or token counts (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=eval_synthetic.SEEDS,
                   help="random-pruning seeds (default %(default)s)")
    p.add_argument("--resamples", type=int, default=RESAMPLES,
                   help="bootstrap resamples for the 95%% intervals (default %(default)s)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=3, help="answers are one word and </s> (default 3)")
    p.add_argument("--out", type=Path, default=Path("eval/synthetic"))
    p.add_argument("--mesh", help="data=D,model=M: run sharded (--batch a multiple of D); default one device")
    a = p.parse_args(argv)
    outputs.check_dir(a.out, "--out")
    return eval_synthetic.run(a.model, a.out, n=a.n, methods=items(a.methods), budgets=items(a.budgets),
                              seeds=a.seeds, batch=a.batch, max_new_tokens=a.max_new_tokens, resamples=a.resamples,
                              split=a.split, mesh=sharding.mesh_option(a.mesh))


def items(values: Sequence[str]) -> list[str]:
    """A command-line list, given as separate words or comma-separated."""
    return [v for value in values for v in value.split(",") if v]


def main(argv: Sequence[str] | None = None, prog: str = "svdprune-jax eval"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog="`svdprune-jax eval BENCHMARK --help` lists a benchmark's options")
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("options", nargs=argparse.REMAINDER)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.benchmark == "synthetic":
        return synthetic_main(args.options)
    return vqa_main(args.benchmark, args.options)
