"""`svdprune-jax bench --geometry llava-next-7b`: the benchmark's LLaVA-NeXT section (issue 25), on run.py's
models, timing and table.

LLaVA-NeXT-7B geometry with the decoder reduced to 2 layers, as the LLaVA-1.5 section (the whole CLIP
ViT-L/14-336 tower, LLaMA 4096 / 32 heads / 11008, vocab 32064, the default pinpoints): one 672 x 672 image,
so the 2 x 2 grid: 5 views through the tower, 2,880 image tokens + 48 `image_newline`s, + a 20-token question
-> 8 new tokens; unpruned and k = 320 / 160 / 64 (the 11.1% / 5.6% / 2.2% shares), svd, one selection over the
image's tokens. transformers' LlavaNextForConditionalGeneration is built in torch (float32, its own random init),
saved and loaded into ours by `convert.load_model`. Ours runs `generate(..., timed=True)` (encode, prefill and
decode as three jits, blocking after each), on `layout(cfg, pixel_values, image_sizes)` made inside the timed
call. The reference computes its image embeddings itself and generates from `inputs_embeds`: unpruned with its own
`get_image_features` (tower, projector, `pack_image_features` with the newlines); pruned, the tower's features in
packed order, its own leverage scoring (torch.linalg.svd, timed and discarded), then the tokens our run kept on
the same image, projected. A streamer timestamps each token `generate` emits: its prefill is the time to the
first token, its decode the time from the first to the last. Rows per budget: generate (whole), encode (unpruned:
tower + projection of the 5 views), prefill, decode per token; then the prefill as a share of the unpruned one
against its FLOP share (prefill_flops: dense attention's T^2 term included). Writes DIR/bench-next.md and .json.
"""
import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from svdprune_jax.benchmarks import run as bench
from svdprune_jax.benchmarks.run import (Inputs, Preset, Suite, hf_model, ours_from, prefill_flops, text_config,
                                         vision_config)
from svdprune_jax.benchmarks.scoring import leverage_torch
from svdprune_jax.benchmarks.timing import Stat, load
from svdprune_jax.models.generate import Decoding, bucket_length, generate
from svdprune_jax.models.llava import Pruning
from svdprune_jax.models.llava_next import PINPOINTS, LlavaNextConfig, layout
from svdprune_jax.models.stack import per_layer

FULL = Preset("LLaVA-NeXT-7B geometry (5 views, 2,880 image tokens), 2-layer decoder",
              vision_config(1024, 4096, 24, 16, 336, 14), text_config(4096, 11008, 2, 32, 32064), 32000,
              budgets=(None, 320, 160, 64), prefill_budgets=(), batches=(1,), reps=3, new_tokens=8,
              pinpoints=PINPOINTS, image_hw=(672, 672))
# 32-pixel tiles of 4 x 4 patches, a 64 x 64 image: the 2 x 2 grid, 5 views, 80 image tokens + 8 newlines; the
# question (6 tokens, 3-6 over the runs) keeps every prompt in one bucket of 16
SMOKE = Preset("smoke (tiny NeXT: 5 views, 80 image tokens)", vision_config(32, 64, 3, 4, 32, 8),
               text_config(32, 64, 2, 4, 128), 127, budgets=(None, 9, 4, 2), prefill_budgets=(), batches=(1,),
               reps=1, question=6, new_tokens=4, pinpoints=((32, 64), (64, 32), (64, 64), (96, 32), (32, 96)),
               image_hw=(64, 64))


class NextInputs(Inputs):
    """run.Inputs with the image as the processor gives it: (1, views, C, s, s), every run the preset's size."""

    def __init__(self, preset: Preset, cfg: LlavaNextConfig):
        super().__init__(preset, cfg)
        self.sizes = np.array([preset.image_hw])
        self.views = cfg.bounds[0]
        probe = layout(cfg, np.zeros((1, self.views, cfg.vision.num_channels, cfg.vision.image_size,
                                      cfg.vision.image_size), np.float32), self.sizes)
        assert probe.counts[0] == cfg.num_image_tokens, "the preset's image must fill every view"
        self.slots = int(probe.lengths[0])  # image tokens + newlines, unpruned
        self.order = np.asarray(probe.tokens[0])  # packed order of the image's tokens (view-major indices)

    def pixels(self, r: int, batch: int = 1) -> np.ndarray:
        v = self.cfg.vision
        rng = np.random.default_rng(1000 + r)
        return rng.standard_normal((batch, self.views, v.num_channels, v.image_size, v.image_size)).astype(np.float32)


class Clock(BaseStreamer):
    """Timestamps of `generate`'s streamer calls: the prompt (empty from inputs_embeds), then each new token."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


class Reference:
    """transformers' LLaVA-NeXT in torch, `generate` from inputs_embeds; `self.stages` gets (encode, prefill,
    decode) seconds of each call."""

    def __init__(self, hf, preset: Preset, inputs: NextInputs):
        self.hf, self.preset, self.stages = hf, preset, []
        self.order = torch.from_numpy(inputs.order).long()
        self.sizes = torch.from_numpy(inputs.sizes)

    @torch.inference_mode()
    def embeds(self, px: np.ndarray, ids: np.ndarray, kept: np.ndarray | None) -> torch.Tensor:
        m, c = self.hf.model, self.hf.config
        if kept is None:
            image = torch.cat(list(m.get_image_features(
                torch.from_numpy(px), self.sizes, vision_feature_layer=c.vision_feature_layer,
                vision_feature_select_strategy=c.vision_feature_select_strategy).pooler_output))
        else:
            h = m.vision_tower(torch.from_numpy(px[0]), output_hidden_states=True).hidden_states[c.vision_feature_layer]
            feats = h[:, 1:].reshape(1, -1, h.shape[-1])[:, self.order]  # (1, 2880, D) in packed order
            k = kept.shape[1]
            leverage_torch(feats, k).topk(k).indices.sort()  # its own scoring, timed
            idx = torch.from_numpy(np.array(kept)).long()
            image = m.multi_modal_projector(torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[-1])))
        ids = torch.from_numpy(ids)
        x = self.hf.get_input_embeddings()(ids)
        x[ids == c.image_token_index] = image.reshape(-1, x.shape[-1])
        return x

    @torch.inference_mode()
    def generate(self, px, ids, kept) -> np.ndarray:
        t = time.perf_counter()
        x = self.embeds(px, ids, kept)
        t1, clock = time.perf_counter(), Clock()
        out = self.hf.generate(inputs_embeds=x, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                               max_new_tokens=self.preset.new_tokens, do_sample=False, streamer=clock)
        first, last = clock.t[-self.preset.new_tokens], clock.t[-1]
        self.stages.append(dict(encode=t1 - t, prefill=first - t1, decode=last - first))
        return out.numpy()


def measure(suite: Suite, ref: Reference, gd, st, cfg: LlavaNextConfig, inputs: NextInputs):
    p, steps = suite.preset, suite.preset.new_tokens - 1
    suite.stages = {}
    for k in p.budgets:
        n = inputs.slots if k is None else k
        kept, tokens, ours_stages = {}, {}, []

        def ours(r):
            images = layout(cfg, inputs.pixels(r), inputs.sizes)
            out = generate(gd, st, images, inputs.ids(r, n), decoding=Decoding(p.new_tokens),
                           pruning=None if k is None else Pruning("svd", k), bucket=p.bucket, timed=True)
            jax.block_until_ready(out.tokens)
            kept[r], tokens["ours", r] = (None if out.kept is None else np.asarray(out.kept)), np.asarray(out.tokens)
            ours_stages.append(out.timings)

        def torch_run(r):
            tokens["torch", r] = ref.generate(inputs.pixels(r), inputs.ids(r, n), kept[r])

        ref.stages = []
        s = suite.measure({"ours": ours, "torch": torch_run})
        same = np.mean([np.array_equal(tokens["ours", r], tokens["torch", r]) for r in range(suite.reps)])
        stage = {side: {name: Stat(tuple(t[name] for t in runs[1:])) for name in ("encode", "prefill", "decode")}
                 for side, runs in (("ours", ours_stages), ("torch", ref.stages))}
        per_token = {side: Stat(tuple(t / steps for t in stage[side]["decode"].runs)) for side in stage}
        case = "unpruned" if k is None else f"k={k} ({k / cfg.num_image_tokens:.1%})"
        T = 1 + n + p.question
        suite.row("generate", f"generate {case}, {p.new_tokens} new tokens", s["ours"], s["torch"],
                  tokens_equal=float(same), **suite._notes())
        encode = ("tower + projection, 5 views packed (+ newlines)" if k is None
                  else "encode: tower + svd scoring + projection of the kept")
        suite.row("generate", f"  {encode}, {case}", stage["ours"]["encode"], stage["torch"]["encode"])
        suite.row("generate", f"  prefill {case}: {T} tokens (bucket {bucket_length(T, p.bucket)})",
                  stage["ours"]["prefill"], stage["torch"]["prefill"], flops=prefill_flops(cfg, T))
        suite.row("generate", f"  decode per token {case} ({steps} steps)", per_token["ours"], per_token["torch"])
        suite.stages[k] = dict(T=T, total=s, per_token=per_token, **stage)


def report(suite: Suite, cfg: LlavaNextConfig) -> tuple[str, dict]:
    p, t = suite.preset, cfg.text
    md = [f"## Benchmark: ours (JAX) vs transformers (PyTorch), {p.name}", "",
          f"{bench._cpu()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__}; float32; one {p.image_hw[0]}x{p.image_hw[1]} image ({cfg.bounds[0]} views of "
          f"{cfg.side ** 2} tokens, {cfg.num_image_tokens} image tokens + newlines = slots unpruned) + a "
          f"{p.question}-token question -> {p.new_tokens} new tokens; {suite.reps} runs after a warm-up, ours and "
          "torch taking turns; ours generate(timed=True) (three jits), compile apart. load = 1-min load average / "
          "cores when the row was measured. Ratios < 1: ours faster.", ""] + bench.table(suite.rows)
    base = suite.stages[None]
    f0 = prefill_flops(cfg, base["T"])
    md += ["", "### Prefill against its FLOP-ideal share of the unpruned prefill",
           f"FLOPs: {t.num_hidden_layers} decoder layers over T tokens (weights 2T x params, dense attention "
           "4 T^2 x width per layer) + the LM head on the last token; ours runs the bucketed length.", "",
           "| budget | tokens | GFLOP (attention share) | FLOP share | ours | ours share | ours / ideal | torch | "
           "torch share | torch / ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for k, d in suite.stages.items():
        fl = prefill_flops(cfg, d["T"])
        ideal = fl / f0
        ro = d["ours"]["prefill"].median / base["ours"]["prefill"].median
        rt = d["torch"]["prefill"].median / base["torch"]["prefill"].median
        rows["unpruned" if k is None else k] = dict(tokens=d["T"], gflop=fl / 1e9, attention_share=bench.attention_flops(cfg, d["T"]) / fl,
                                                    flop_share=ideal, ours_share=ro, torch_share=rt)
        md.append(f"| {'unpruned' if k is None else f'k={k}'} | {d['T']} | {fl / 1e9:.4g} ({bench.attention_flops(cfg, d['T']) / fl:.1%}) | "
                  f"{ideal:.3f} | {bench._fmt(d['ours']['prefill'])} | {ro:.3f} | {ro / ideal:.2f} | "
                  f"{bench._fmt(d['torch']['prefill'])} | {rt:.3f} | {rt / ideal:.2f} |")
    recompiles = sum(row.get("recompiles") or 0 for row in suite.rows)
    md += ["", f"Compilations during the timed runs: {recompiles}."]
    data = dict(preset=dataclasses.asdict(p), machine=bench.machine(), reps=suite.reps,
                rows=bench.rows_json(suite.rows), prefill=rows, recompiles=recompiles)
    return "\n".join(md) + "\n", data


def run(args: argparse.Namespace) -> int:
    preset = SMOKE if args.smoke else FULL
    suite = Suite(preset, args.reps or preset.reps)
    t0 = time.perf_counter()
    hf = hf_model(preset)
    model = ours_from(hf)
    cfg = model.config
    assert isinstance(cfg, LlavaNextConfig)
    per_layer(model)
    gd, st = bench.nnx.split(model)
    inputs = NextInputs(preset, cfg)
    ref = Reference(hf, preset, inputs)
    print(f"{preset.name}: models built in {time.perf_counter() - t0:.0f} s; load {load()}", flush=True)
    t = time.perf_counter()
    measure(suite, ref, gd, st, cfg, inputs)
    print(f"  generate: {time.perf_counter() - t:.0f} s, load {load()}", flush=True)
    md, data = report(suite, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-next.md").write_text(md)
    (args.out / "bench-next.json").write_text(json.dumps(data, indent=1, default=str))
    print(md)
    return 0
