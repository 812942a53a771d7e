"""Speed of ours (JAX, jitted) against transformers PyTorch, same random weights and inputs: one table of ratios.

    python -m svdprune_jax.benchmarks.run [--smoke] [--geometry llava-1.5-7b llava-next-7b] [--out DIR]
                                          [--reps N]

--geometry picks the sections (default llava-1.5-7b, this file; --smoke: both): llava-next-7b is run_next.py's
(LLaVA-NeXT-7B, 5 views, 2,880 image tokens, unpruned and k = 320/160/64, bench-next.md), on this file's models,
timing and table.

Items (issue 7): 1 token scoring at LLaVA-1.5 geometry (576 x 1024), 2 end-to-end pruned generation (one image + a
20-token question -> 16 new tokens; unpruned and k = 64, 32, 16) with its stages, 3 language-model prefill against
the FLOP-ideal ratio (also unpadded, and beside the time to read the weights once), 4 batch scaling, 5 peak RSS
and compile time with and without JAX's persistent cache. The full preset is LLaVA-1.5-7B geometry with a 2-layer
decoder (the whole CLIP ViT-L/14-336 tower, LLaMA 4096 / 32 heads / 11008, vocab 32064): the HF model is built in
torch (float32, its own random init), saved, loaded into ours by `convert.load_model` and moved to the per-layer
inference layout. Each figure is the median and min-max of `reps` runs after a warm-up, ours and the reference
taking turns; inputs (image, question tokens, question length within one prompt bucket) change every run, and XLA
compilations during the timed runs are counted (must be 0). The torch side prunes with the kept indices of our run
on the same image (its own leverage scoring, torch.linalg.svd, is timed too) and generates from `inputs_embeds`.
Beside the ratios: each part as a fraction of its roofline (tower vs the GEMM rate, decode vs memory bandwidth,
both measured in the same run), per-layer decoder cost with a 32-layer estimate, the targets, and the stacked ->
per-layer layout change. --smoke: tiny configs, one run each, seconds (CI; no layout comparison, no compile-cache
processes).
Writes DIR/bench.json and DIR/bench.md.
"""
import os

# JAX's CPU svd/eigh and NumPy run on OpenBLAS, whose spinning threads fight XLA's for the cores (scoring.py);
# one BLAS thread, set before NumPy loads (`python -m svdprune_jax.benchmarks.run`; callers importing main set it themselves).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib
import dataclasses
import functools
import json
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlavaConfig as HFConfig
from transformers import LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

import svdprune_jax.convert as convert
import svdprune_jax as sp
from svdprune_jax.benchmarks import GEOMETRIES, main
from svdprune_jax.benchmarks.scoring import leverage64, leverage_torch
from svdprune_jax.benchmarks.timing import Compiles, PeakRSS, Stat, interleaved, load
from svdprune_jax.models.cache import KVCache
from svdprune_jax.models.generate import Decoding, bucket_length, generate, generate_program, prefill_stage
from svdprune_jax.models.llava import Llava, LlavaConfig, Pruning
from svdprune_jax.models.stack import per_layer


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    vision: dict  # HF vision_config
    text: dict  # HF text_config
    image_token_id: int
    budgets: tuple[int | None, ...]  # item 2 (None: unpruned)
    prefill_budgets: tuple[int, ...]  # item 3
    batches: tuple[int, ...]  # item 4
    reps: int
    question: int = 20  # question tokens; runs vary it down to question - 3, inside one prompt bucket
    new_tokens: int = 16
    bucket: int = 16  # prompt padding multiple (generate's default 64 pads k=64's 85 tokens to 128)
    k_main: int = 32  # the budget of the targets, the batch scaling and the per-layer figures
    scoring_batch: int = 8
    pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT (run_next.py): image_grid_pinpoints
    image_hw: tuple[int, int] = (0, 0)  # LLaVA-NeXT: the image size (H, W) every run's image has


def text_config(hidden, intermediate, layers, heads, vocab) -> dict:
    """A transformers LlamaConfig dict (MHA, llava-1.5's norm eps) of the given geometry."""
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def vision_config(hidden, intermediate, layers, heads, image, patch) -> dict:
    """A transformers CLIPVisionConfig dict of the given geometry."""
    return dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, image_size=image, patch_size=patch,
                projection_dim=16)


FULL = Preset("LLaVA-1.5-7B geometry, 2-layer decoder", vision_config(1024, 4096, 24, 16, 336, 14),
              text_config(4096, 11008, 2, 32, 32064), 32000, budgets=(None, 64, 32, 16),
              prefill_budgets=(576, 192, 128, 64, 32, 16), batches=(1, 4, 8), reps=5)
SMOKE = Preset("smoke (tiny)", vision_config(32, 64, 3, 4, 28, 7), text_config(32, 64, 2, 4, 128), 127,
               budgets=(4,), prefill_budgets=(16, 4), batches=(1,), reps=1, question=8, new_tokens=4, k_main=4,
               scoring_batch=2)


# ---------------------------------------------------------------- models and inputs

def hf_config(preset: Preset) -> HFConfig | LlavaNextConfig:
    kw = dict(vision_config=preset.vision, text_config=preset.text, image_token_index=preset.image_token_id,
              vision_feature_layer=-2, vision_feature_select_strategy="default")
    if preset.pinpoints is not None:
        return LlavaNextConfig(**kw, image_grid_pinpoints=[list(p) for p in preset.pinpoints])
    return HFConfig(**kw)


def hf_model(preset: Preset) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """transformers' model of the preset, its own random init (torch seed 0): LLaVA, or LLaVA-NeXT when the
    preset has pinpoints."""
    torch.manual_seed(0)
    cls = LlavaForConditionalGeneration if preset.pinpoints is None else LlavaNextForConditionalGeneration
    hf = cls(hf_config(preset)).eval()
    hf.generation_config.eos_token_id = None  # always 16 new tokens, as ours with eos_token_id=None
    hf.generation_config.pad_token_id = 0
    return hf


def ours_from(hf) -> Llava:
    """Our model holding the HF model's weights, by the checkpoint path (save_pretrained -> load_model)."""
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return convert.load_model(d, dtype="float32")


def shallow(model: Llava, layers: int) -> tuple[nnx.GraphDef, nnx.State]:
    """The first `layers` decoder layers of a per-layer model, sharing its buffers (per-layer costs)."""
    cfg = model.config
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: per_layer(Llava(cfg, rngs=nnx.Rngs(0)))))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["language_model"]["layers"] = {i: params["language_model"]["layers"][i] for i in range(layers)}
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


@contextlib.contextmanager
def torch_shallow(hf, layers: int):
    """The HF model running only its first `layers` decoder layers inside the block."""
    lm, cfg = hf.model.language_model, hf.config.text_config
    full, n = lm.layers, cfg.num_hidden_layers
    lm.layers, cfg.num_hidden_layers = torch.nn.ModuleList(list(full)[:layers]), layers
    try:
        yield
    finally:
        lm.layers, cfg.num_hidden_layers = full, n


class Inputs:
    """Deterministic per-run inputs: run r (warm-ups are negative) gets its own image and question, the
    question `r mod 4` tokens shorter, which keeps every run in one prompt bucket."""

    def __init__(self, preset: Preset, cfg: LlavaConfig):
        self.preset, self.cfg = preset, cfg

    def pixels(self, r: int, batch: int = 1) -> np.ndarray:
        v = self.cfg.vision
        rng = np.random.default_rng(1000 + r)
        return rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)

    def ids(self, r: int, n_image: int, batch: int = 1) -> np.ndarray:
        rng = np.random.default_rng(2000 + r)
        q = self.preset.question - r % 4
        text = rng.integers(3, min(self.cfg.image_token_id, self.cfg.text.vocab_size), (batch, q))
        return np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, n_image), self.cfg.image_token_id),
                               text], axis=1)


class Reference:
    """transformers' LLaVA in torch: tower, SVD-Prune scoring (torch.linalg.svd), projector, `generate` from
    inputs_embeds. `generate` records its encode / LM seconds in `self.stages`."""

    def __init__(self, hf, preset: Preset):
        self.hf, self.preset, self.stages = hf, preset, []

    @torch.inference_mode()
    def features(self, px: np.ndarray) -> torch.Tensor:
        return self.hf.model.vision_tower(torch.from_numpy(px), output_hidden_states=True).hidden_states[-2][:, 1:]

    @torch.inference_mode()
    def embeds(self, px, ids, kept: np.ndarray | None) -> torch.Tensor:
        feats = self.features(px)
        if kept is not None:
            leverage_torch(feats, kept.shape[1]).topk(kept.shape[1]).indices.sort()  # its own scoring, timed
            idx = torch.from_numpy(np.array(kept)).long()
            feats = torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[-1]))
        image = self.hf.model.multi_modal_projector(feats)
        ids = torch.from_numpy(ids)
        x = self.hf.get_input_embeddings()(ids)
        x[ids == self.hf.config.image_token_index] = image.reshape(-1, x.shape[-1])
        return x

    @torch.inference_mode()
    def generate(self, px, ids, kept) -> np.ndarray:
        t = time.perf_counter()
        x = self.embeds(px, ids, kept)
        t1 = time.perf_counter()
        out = self.hf.generate(inputs_embeds=x, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                               max_new_tokens=self.preset.new_tokens, do_sample=False)
        self.stages.append((t1 - t, time.perf_counter() - t1))
        return out.numpy()

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor):
        h = self.hf.model.language_model(inputs_embeds=x, use_cache=True).last_hidden_state
        return self.hf.lm_head(h[:, -1])


STAGES = ("encode", "prefill", "decode")  # the stages `generate(..., timed=True)` times


def stage_stats(timings: list[dict]) -> dict[str, Stat]:
    """Per stage, the seconds of timed `generate` runs, the first (the warm-up) dropped."""
    return {name: Stat(tuple(t[name] for t in timings[1:])) for name in STAGES}


def ours_generate(graphdef, state, preset: Preset, px, ids, k: int | None, timed: bool = False):
    out = generate(graphdef, state, px, ids, decoding=Decoding(preset.new_tokens),
                   pruning=None if k is None else Pruning("svd", k), bucket=preset.bucket, timed=timed)
    jax.block_until_ready(out.tokens)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _tower(graphdef, state, px):
    return nnx.merge(graphdef, state).image_features(px)[0]


# ---------------------------------------------------------------- FLOPs and bytes (float32)

def tower_flops(cfg: LlavaConfig, layers: int) -> float:
    v = cfg.vision
    T, D, F = 1 + v.num_patches, v.hidden_size, v.intermediate_size
    per = 2 * T * (4 * D * D + 2 * D * F) + 4 * T * T * D
    return layers * per + 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * D


def _layer_params(t) -> int:
    D, F, q, kv = t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return D * q + 2 * D * kv + q * D + 3 * D * F


def attention_flops(cfg: LlavaConfig, T: int) -> float:
    """The dense T x T attention of every decoder layer (scores and weighted sum), as computed."""
    t = cfg.text
    return t.num_hidden_layers * 4 * T * T * t.num_attention_heads * t.head_dim


def prefill_flops(cfg: LlavaConfig, T: int) -> float:
    """Decoder layers over T tokens (dense T x T attention, as computed) + the LM head on the last one."""
    t = cfg.text
    return t.num_hidden_layers * 2 * T * _layer_params(t) + attention_flops(cfg, T) + 2 * t.hidden_size * t.vocab_size


def decode_bytes(cfg: LlavaConfig, slots: int) -> float:
    """Bytes one decode step must read: every decoder weight, the LM head, the KV cache."""
    t = cfg.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * slots * t.head_dim
    return 4 * (t.num_hidden_layers * _layer_params(t) + t.hidden_size * t.vocab_size + kv)


# ---------------------------------------------------------------- the suite

class Suite:
    def __init__(self, preset: Preset, reps: int):
        self.preset, self.reps = preset, reps
        self.rows, self.extra, self.compiled = [], {}, Compiles()

    def row(self, item: str, case: str, ours: Stat | None, ref: Stat | None, **notes):
        self.rows.append(dict(item=item, case=case, ours=ours, ref=ref, load=load(), **notes))

    def measure(self, fns: dict, reps: int | None = None) -> dict[str, Stat]:
        """`interleaved` with peak RSS above the entry RSS per callable, compile seconds during warm-up and
        compilations during the timed runs (after warm-up) recorded in self.last."""
        rss, compile_s = {name: 0 for name in fns}, {name: 0.0 for name in fns}
        timed_compiles = Compiles()

        def wrap(name, fn):
            def call(r):
                with PeakRSS() as m, Compiles() as c:
                    fn(r)
                rss[name] = max(rss[name], m.above)
                if r < 0:
                    compile_s[name] += c.seconds
                else:
                    timed_compiles.count += c.count
            return call

        stats = interleaved({n: wrap(n, f) for n, f in fns.items()}, reps or self.reps)
        self.last = dict(rss=rss, compile=compile_s, recompiles=timed_compiles.count)
        return stats

    # -- roofline probes
    def roofline(self):
        n = 577 if self.preset is FULL else 64
        a, b = jnp.ones((n, 1024)), jnp.ones((1024, 4096))
        big = jnp.ones(64 * 2 ** 20 if self.preset is FULL else 2 ** 20)
        gemm, total = jax.jit(jnp.matmul), jax.jit(jnp.sum)
        s = self.measure({"gemm": lambda r: gemm(a, b).block_until_ready(),
                          "sum": lambda r: total(big).block_until_ready()}, max(self.reps, 5))
        self.gemm_rate = 2 * n * 1024 * 4096 / s["gemm"].lo  # the bounds: best runs
        self.bandwidth = big.nbytes / s["sum"].lo
        self.extra["roofline"] = dict(gemm_gflops=self.gemm_rate / 1e9, bandwidth_gbs=self.bandwidth / 1e9,
                                      gemm_shape=f"{n}x1024 @ 1024x4096", load=load())

    # -- item 1 and the tower
    def scoring_and_tower(self, ref: Reference, gd, st, cfg: LlavaConfig, inputs: Inputs):
        v = cfg.vision
        n, d, k = v.num_patches, v.hidden_size, self.preset.k_main
        rng = np.random.default_rng(0)
        tower = self.measure({"ours": lambda r: _tower(gd, st, inputs.pixels(r)).block_until_ready(),
                              "torch": lambda r: ref.features(inputs.pixels(r))})
        self.row("2", "vision tower (features only)", tower["ours"], tower["torch"], **self._notes())
        self.tower = tower
        for b in (1, self.preset.scoring_batch):
            x = rng.standard_normal((b, n, d)).astype(np.float32)
            xd, xt = jax.device_put(x), torch.from_numpy(x)
            fns = {s: jax.jit(jax.vmap(lambda f, s=s: sp.leverage_scores(f, k, solver=s))) for s in ("svd", "gram")}
            with torch.inference_mode():
                st_ = self.measure({**{s: (lambda r, f=f: f(xd).block_until_ready()) for s, f in fns.items()},
                                    "torch": lambda r: leverage_torch(xt, k),
                                    "numpy64": lambda r: leverage64(x, k)}, max(self.reps, 7))
            notes = self._notes()
            for s in fns:
                share = st_[s].median / b / tower["ours"].median
                self.row("1", f"scoring {s}, {n}x{d}, batch {b} vs torch.linalg.svd", st_[s], st_["torch"],
                         share_of_tower=share, **notes)
            self.row("1", f"scoring svd, batch {b} vs NumPy float64", st_["svd"], st_["numpy64"], **notes)

    def _notes(self) -> dict:
        return dict(rss_ours=self.last["rss"].get("ours"), rss_ref=self.last["rss"].get("torch"),
                    compile_s=self.last["compile"].get("ours"), recompiles=self.last["recompiles"])

    # -- item 2
    def end_to_end(self, ref: Reference, gd, st, inputs: Inputs, layout_before: dict | None):
        p, self.e2e = self.preset, {}
        for k in p.budgets:
            n = inputs.cfg.num_image_tokens if k is None else k
            kept, tokens = {}, {}

            def ours(r, timed=False):
                out = ours_generate(gd, st, p, inputs.pixels(r), inputs.ids(r, n), k, timed)
                kept[r], tokens["ours", r] = (None if out.kept is None else np.asarray(out.kept)), np.asarray(out.tokens)
                if timed:
                    stages.append(out.timings)

            def torch_run(r):
                tokens["torch", r] = ref.generate(inputs.pixels(r), inputs.ids(r, n), kept[r])

            stages, ref.stages = [], []
            s = self.measure({"ours": ours, "ours timed": functools.partial(ours, timed=True), "torch": torch_run})
            same = np.mean([np.array_equal(tokens["ours", r], tokens["torch", r]) for r in range(self.reps)])
            parts = stage_stats(stages)
            t_enc, t_lm = (Stat(tuple(t[i] for t in ref.stages[1:])) for i in (0, 1))
            case = "unpruned" if k is None else f"k={k}"
            self.row("2", f"generate {case}, 1 image, {p.new_tokens} new tokens", s["ours"], s["torch"],
                     tokens_equal=float(same), **self._notes())
            self.row("2", f"  encode (tower+scoring+projector) {case}", parts["encode"], t_enc)
            self.row("2", f"  prefill + decode {case}", Stat(tuple(a + b for a, b in zip(parts["prefill"].runs,
                                                                                     parts["decode"].runs))), t_lm)
            self.e2e[k] = dict(total=s["ours"], ref=s["torch"], timed=s["ours timed"], ref_encode=t_enc, ref_lm=t_lm,
                               **parts)
        if layout_before is not None:
            after = self.e2e[p.k_main]
            self.extra["layout"] = {stage: dict(stacked=layout_before[stage].json(), per_layer=after[stage].json())
                                    for stage in STAGES}

    def layout_before(self, gd, st, inputs: Inputs) -> dict[str, Stat]:
        """Stage seconds of the stacked layout (as loaded) at k_main: the 'before' of the layout change."""
        p, stages = self.preset, []
        self.measure({"stacked": lambda r: stages.append(ours_generate(gd, st, p, inputs.pixels(r),
                                                                       inputs.ids(r, p.k_main), p.k_main, True).timings)})
        self.extra["layout_compile_stacked_s"] = self.last["compile"]["stacked"]
        return stage_stats(stages)

    # -- item 3
    def prefill(self, ref: Reference, gd, st, cfg: LlavaConfig, inputs: Inputs):
        p, t = self.preset, cfg.text
        self.prefill_stats = {}
        for k in p.prefill_budgets:
            def ids_mask(r, bucket):
                ids = inputs.ids(r, k)
                pad = bucket_length(ids.shape[1], bucket) - ids.shape[1]
                return (jnp.asarray(np.pad(ids, ((0, 0), (pad, 0)))), jnp.asarray(np.pad(np.ones_like(ids), ((0, 0), (pad, 0)))))

            image = np.random.default_rng(k).standard_normal((1, k, t.hidden_size)).astype(np.float32) * 0.02
            image_j, image_t = jnp.asarray(image), torch.from_numpy(image)

            def ours(r, bucket=p.bucket):
                ids, mask = ids_mask(r, bucket)
                cache = KVCache.init(t, 1, (ids.shape[1] + p.new_tokens - 1,))
                jax.block_until_ready(prefill_stage(gd, st, ids, mask, image_j, cache, fastv=None)[0])

            def torch_run(r):
                ids = inputs.ids(r, k)
                with torch.inference_mode():
                    x = ref.hf.get_input_embeddings()(torch.from_numpy(ids))
                    x[torch.from_numpy(ids) == cfg.image_token_id] = image_t.reshape(-1, t.hidden_size)
                    ref.prefill(x)

            # unpadded (bucket 1) apart, how much of the gap is padding: runs 4r hold the full-length question,
            # so one program serves every run
            s = self.measure({"ours": ours, "ours_unpadded": lambda r: ours(4 * r, bucket=1), "torch": torch_run})
            self.prefill_stats[k] = s
            T = 1 + k + p.question
            self.row("3", f"LM prefill k={k} ({T} tokens, bucket {bucket_length(T, p.bucket)})", s["ours"], s["torch"],
                     flops=prefill_flops(cfg, T), **self._notes())

    # -- item 4
    def batches(self, ref: Reference, gd, st, inputs: Inputs):
        p, k = self.preset, self.preset.k_main
        self.batch_stats = {}
        for b in p.batches:
            if b == 1:
                s = {"ours": self.e2e[k]["total"], "torch": self.e2e[k]["ref"]}
            else:
                kept = {}

                def ours(r):
                    out = ours_generate(gd, st, p, inputs.pixels(r, b), inputs.ids(r, k, b), k)
                    kept[r] = np.asarray(out.kept)

                s = self.measure({"ours": ours, "torch": lambda r: ref.generate(inputs.pixels(r, b),
                                                                                inputs.ids(r, k, b), kept[r])})
            self.batch_stats[b] = s
            self.row("4", f"batch {b}, k={k}: seconds per image ({b / s['ours'].median:.2f} vs "
                          f"{b / s['torch'].median:.2f} images/s)", _per(s["ours"], b), _per(s["torch"], b),
                     **(self._notes() if b > 1 else {}))

    # -- per-layer decoder cost and the 32-layer estimate
    def per_layer_cost(self, ref: Reference, model: Llava, inputs: Inputs):
        p, L = self.preset, model.config.text.num_hidden_layers
        gd1, st1 = shallow(model, 1)
        out = {}
        for k in [b for b in p.budgets if b in (None, p.k_main)]:
            n = inputs.cfg.num_image_tokens if k is None else k
            stages, kept = [], {}

            def ours(r):
                o = ours_generate(gd1, st1, p, inputs.pixels(r), inputs.ids(r, n), k, True)
                stages.append(o.timings)
                kept[r] = None if o.kept is None else np.asarray(o.kept)

            ref.stages = []
            with torch_shallow(ref.hf, 1):
                self.measure({"ours": ours, "torch": lambda r: ref.generate(inputs.pixels(r), inputs.ids(r, n), kept[r])})
            one = {name: s.median for name, s in stage_stats(stages).items()}
            ref1 = float(np.median([t[1] for t in ref.stages[1:]]))
            two = {name: self.e2e[k][name].median for name in STAGES}
            ref2 = self.e2e[k]["ref_lm"].median
            d = {name: (two[name] - one[name]) / (L - 1) for name in ("prefill", "decode")}
            ref_d = (ref2 - ref1) / (L - 1)
            est = two["encode"] + one["prefill"] + one["decode"] + 31 * (d["prefill"] + d["decode"])
            ref_est = self.e2e[k]["ref_encode"].median + ref1 + 31 * ref_d
            out["unpruned" if k is None else f"k={k}"] = dict(
                ours_layer_prefill=d["prefill"], ours_layer_decode=d["decode"], ours_layer_lm=d["prefill"] + d["decode"],
                torch_layer_lm=ref_d, ours_32_layers=est, torch_32_layers=ref_est, load=load())
        self.extra["per_layer"] = out

    # -- item 5: compile with and without the persistent cache (fresh processes)
    def compile_cache(self):
        with tempfile.TemporaryDirectory() as cache:
            runs = {}
            for name, layout, d in (("stacked, no cache", "stacked", None), ("per-layer, no cache", "per_layer", None),
                                    ("per-layer, cold cache", "per_layer", cache),
                                    ("per-layer, warm cache", "per_layer", cache)):
                cmd = [sys.executable, "-m", "svdprune_jax.benchmarks.run", "--compile-probe", layout]
                if d:
                    cmd += ["--cache", d]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[name] = json.loads(res.stdout.strip().splitlines()[-1])
        self.extra["compile"] = dict(program=f"generate k={self.preset.k_main} (encode+prefill+decode, one jit)",
                                     seconds=runs, load=load())
        for name, r in runs.items():
            self.row("5", f"first-call compile, {name}", Stat((r["seconds"],)), None)


def _per(s: Stat, b: int) -> Stat:
    return Stat(tuple(t / b for t in s.runs))


def compile_probe(preset: Preset, layout: str, cache: str | None) -> dict:
    """Seconds to lower and compile the one-jit generate program for k_main from shapes alone."""
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cfg = LlavaConfig.from_hf(hf_config(preset).to_dict())
    make = lambda: Llava(cfg, rngs=nnx.Rngs(0))
    gd, st = nnx.split(nnx.eval_shape(lambda: per_layer(make()) if layout == "per_layer" else make()))
    inputs = Inputs(preset, cfg)
    ids = inputs.ids(0, preset.k_main)
    T = bucket_length(ids.shape[1], preset.bucket)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    t = time.perf_counter()
    generate_program.lower(gd, st, spec(inputs.pixels(0).shape, jnp.float32), spec((1, T), jnp.int32),
                           spec((1, T), jnp.int32), jax.random.key(0), None, Decoding(preset.new_tokens).as_arrays(),
                           pruning=Pruning("svd", preset.k_main), fastv=None).compile()
    return dict(seconds=time.perf_counter() - t)


# ---------------------------------------------------------------- report

def _fmt(s: Stat | None) -> str:
    if s is None:
        return "-"
    scale, unit = (1e3, "ms") if s.median < 1 else (1, "s")
    return f"{s.median * scale:.4g} ({s.lo * scale:.3g}-{s.hi * scale:.3g}) {unit}"


def _ratio(row) -> tuple[float, float, float] | None:
    o, r = row["ours"], row["ref"]
    if o is None or r is None:
        return None
    return o.median / r.median, o.lo / r.hi, o.hi / r.lo


def rows_json(rows) -> list[dict]:
    """The table's rows for bench.json: Stats as dicts, each row's ratio beside."""
    return [{k: (v.json() if isinstance(v, Stat) else v) for k, v in r.items()} | {"ratio": _ratio(r)} for r in rows]


def table(rows) -> list[str]:
    head = "| item | case | ours median (min-max) | reference median (min-max) | ours / ref (range) | notes |"
    lines = [head, "|---|---|---|---|---|---|"]
    for row in rows:
        q = _ratio(row)
        notes = [f"load {row['load']}"]
        for key, fmt in (("share_of_tower", "{:.2%} of tower"), ("tokens_equal", "tokens equal {:.0%}"),
                         ("compile_s", "compile {:.1f} s"), ("recompiles", "recompiles {}"),
                         ("rss_ours", "RSS+ ours {:.2g} GB"), ("rss_ref", "ref {:.2g} GB")):
            v = row.get(key)
            if v is not None:
                notes.append(fmt.format(v / 1e9 if key.startswith("rss") else v))
        ratio = "-" if q is None else f"**{q[0]:.2f}** ({q[1]:.2f}-{q[2]:.2f})"
        lines.append(f"| {row['item']} | {row['case']} | {_fmt(row['ours'])} | {_fmt(row['ref'])} | {ratio} | "
                     f"{', '.join(notes)} |")
    return lines


def report(suite: Suite, cfg: LlavaConfig, machine: dict) -> tuple[str, dict]:
    """Markdown and JSON: the table, then rooflines, prefill vs FLOPs, per-layer costs, targets, layout."""
    p, e2e = suite.preset, suite.e2e
    md = [f"## Benchmark: ours (JAX) vs transformers (PyTorch), {p.name}", "",
          f"{machine['cpu']}, {machine['cores']} cores; jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__}; float32; {suite.reps} runs after warm-up; load = 1-min load average / cores "
          "when the row was measured. Ratios < 1: ours faster.", ""] + table(suite.rows)
    rl = suite.extra["roofline"]
    T_img = 1 + cfg.vision.num_patches
    tower_depth = suite.tower_layers
    tower_rate = tower_flops(cfg, tower_depth) / suite.tower["ours"].median
    ref_rate = tower_flops(cfg, cfg.vision.num_hidden_layers) / suite.tower["torch"].median
    k = p.k_main
    steps = p.new_tokens - 1
    slots = bucket_length(1 + k + p.question, p.bucket) + p.new_tokens - 1
    step = e2e[k]["decode"].median / steps
    bw = decode_bytes(cfg, slots) / step
    fr = dict(tower_gflops=tower_rate / 1e9, tower_fraction=tower_rate / suite.gemm_rate,
              torch_tower_gflops=ref_rate / 1e9, torch_tower_fraction=ref_rate / suite.gemm_rate,
              decode_step_s=step, decode_gbs=bw / 1e9, decode_fraction=bw / suite.bandwidth)
    md += ["", "### Rooflines (measured in this run)",
           f"GEMM {rl['gemm_shape']}: {rl['gemm_gflops']:.0f} GFLOP/s; jax sum of a large array: "
           f"{rl['bandwidth_gbs']:.1f} GB/s (load {rl['load']}).",
           f"- vision tower ({tower_depth} layers, {T_img} tokens, {tower_flops(cfg, tower_depth) / 1e9:.0f} GFLOP): "
           f"ours {fr['tower_gflops']:.0f} GFLOP/s = {fr['tower_fraction']:.0%} of the GEMM rate; torch "
           f"({cfg.vision.num_hidden_layers} layers) {fr['torch_tower_gflops']:.0f} GFLOP/s = {fr['torch_tower_fraction']:.0%}",
           f"- decode at k={k}: {step * 1e3:.0f} ms per step reading {decode_bytes(cfg, slots) / 1e9:.2f} GB = "
           f"{fr['decode_gbs']:.1f} GB/s = {fr['decode_fraction']:.0%} of the measured bandwidth"]
    pre = suite.prefill_stats
    base = max(pre)
    md += ["", "### Item 3: prefill time against the FLOP-ideal ratio (to the unpruned prompt)",
           "| k | tokens | FLOP ratio | ours t/t_unpruned | ours / ideal | ours unpadded / ideal | torch t/t_unpruned "
           "| torch / ideal | weight-read floor / t_k |", "|---|---|---|---|---|---|---|---|---|"]
    prefill_rows = {}
    # every prefill reads each decoder weight and the LM head once, however few its tokens
    floor = decode_bytes(cfg, 0) / suite.bandwidth
    for kk, s in pre.items():
        T, T0 = 1 + kk + p.question, 1 + base + p.question
        ideal = prefill_flops(cfg, T) / prefill_flops(cfg, T0)
        ro, rt = s["ours"].median / pre[base]["ours"].median, s["torch"].median / pre[base]["torch"].median
        rx = s["ours_unpadded"].median / pre[base]["ours_unpadded"].median
        prefill_rows[kk] = dict(tokens=T, flop_ratio=ideal, ours_ratio=ro, ours_unpadded_ratio=rx, torch_ratio=rt)
        md.append(f"| {kk} | {T} | {ideal:.3f} | {ro:.3f} | {ro / ideal:.2f} | {rx / ideal:.2f} | {rt:.3f} | "
                  f"{rt / ideal:.2f} | {floor / s['ours'].median:.0%} |")
    pl = suite.extra.get("per_layer", {})
    if pl:
        md += ["", "### Per decoder layer (2-layer minus 1-layer runs) and the 32-layer estimate",
               "| budget | ours prefill / layer | ours decode / layer | ours LM / layer | torch LM / layer | "
               "ours 32 layers | torch 32 layers | ours / torch |", "|---|---|---|---|---|---|---|---|"]
        for case, d in pl.items():
            md.append(f"| {case} | {d['ours_layer_prefill']:.3f} s | {d['ours_layer_decode']:.3f} s | "
                      f"{d['ours_layer_lm']:.3f} s | {d['torch_layer_lm']:.3f} s | {d['ours_32_layers']:.2f} s | "
                      f"{d['torch_32_layers']:.2f} s | {d['ours_32_layers'] / d['torch_32_layers']:.2f} |")
    targets = _targets(suite, prefill_rows)
    md += ["", "### Targets"] + [f"- {'met' if t['met'] else 'MISSED'}: {t['what']}: {t['value']}" for t in targets]
    if "layout" in suite.extra:
        md += ["", f"### Layout: stacked (fori_loop, as loaded) -> per-layer buffers, k={k} stage medians",
               "| stage | stacked | per-layer | after / before |", "|---|---|---|---|"]
        for stage, d in suite.extra["layout"].items():
            md.append(f"| {stage} | {d['stacked']['median']:.3f} s | {d['per_layer']['median']:.3f} s | "
                      f"{d['per_layer']['median'] / d['stacked']['median']:.2f} |")
    if "compile" in suite.extra:
        md += ["", f"Compile: {suite.extra['compile']['program']}, fresh process, from shapes: " + ", ".join(
            f"{n} {r['seconds']:.1f} s" for n, r in suite.extra["compile"]["seconds"].items())]
    data = dict(preset=dataclasses.asdict(p), machine=machine, reps=suite.reps,
                rows=rows_json(suite.rows),
                fractions=fr, prefill=prefill_rows, prefill_weight_floor_s=floor, targets=targets, **suite.extra)
    return "\n".join(md) + "\n", data


def _targets(suite: Suite, prefill_rows: dict) -> list[dict]:
    p, e2e, k = suite.preset, suite.e2e, suite.preset.k_main
    score = next(r for r in suite.rows if r["item"] == "1" and r["case"].startswith("scoring svd") and "batch 1 " in r["case"])
    out = [dict(what="SVD-Prune scoring (svd solver) <= 2% of the vision tower", met=score["share_of_tower"] <= 0.02,
                value=f"{score['share_of_tower']:.2%}")]
    if None in e2e and k in e2e:
        vs_ref = e2e[k]["ref"].median / e2e[k]["total"].median
        vs_self = e2e[None]["total"].median / e2e[k]["total"].median
        enc = e2e[k]["encode"].median / e2e[k]["total"].median
        out += [dict(what=f"generate k={k} >= 1.3x faster than torch k={k}", met=vs_ref >= 1.3, value=f"{vs_ref:.2f}x"),
                dict(what=f"generate k={k} >= 3x faster than our unpruned", met=vs_self >= 3,
                     value=f"{vs_self:.2f}x (encode is {enc:.0%} of the k={k} run)")]
    k64 = 64 if 64 in prefill_rows else min(prefill_rows)
    r = prefill_rows[k64]
    out.append(dict(what=f"prefill k={k64} within 1.3x of the FLOP-ideal ratio", met=r["ours_ratio"] / r["flop_ratio"] <= 1.3,
                    value=f"{r['ours_ratio'] / r['flop_ratio']:.2f}x"))
    recompiles = sum(row.get("recompiles") or 0 for row in suite.rows)
    out.append(dict(what="no recompilation across images / prompts of one bucket", met=recompiles == 0,
                    value=f"{recompiles} compilations during timed runs"))
    return out


# ---------------------------------------------------------------- entry

def run(args: argparse.Namespace) -> int:
    """The benchmark for `svdprune_jax.benchmarks.parser`'s arguments: each geometry asked for (default: LLaVA-1.5
    only; --smoke both), one after the other in this process."""
    geometries = args.geometry or (GEOMETRIES if args.smoke and not args.compile_probe else GEOMETRIES[:1])
    torch.set_num_threads(os.cpu_count() or 1)
    for g in geometries:
        if g == "llava-next-7b":
            from svdprune_jax.benchmarks import run_next
            run_next.run(args)
        else:
            run_15(args)
    return 0


def run_15(args: argparse.Namespace) -> int:
    """LLaVA-1.5-7B geometry: items 1-5, bench.md / bench.json."""
    preset = SMOKE if args.smoke else FULL
    if args.compile_probe:
        print(json.dumps(compile_probe(preset, args.compile_probe, args.cache)))
        return 0
    suite = Suite(preset, args.reps or preset.reps)
    t0 = time.perf_counter()
    hf = hf_model(preset)
    model = ours_from(hf)
    cfg = model.config
    suite.tower_layers = model.vision_tower.num_layers
    ref, inputs = Reference(hf, preset), Inputs(preset, cfg)
    print(f"{preset.name}: models built in {time.perf_counter() - t0:.0f} s; load {load()}", flush=True)
    suite.roofline()
    before = None if args.smoke else suite.layout_before(*nnx.split(model), inputs)
    per_layer(model)
    gd, st = nnx.split(model)
    steps = [("scoring + tower", lambda: suite.scoring_and_tower(ref, gd, st, cfg, inputs)),
             ("end to end", lambda: suite.end_to_end(ref, gd, st, inputs, before)),
             ("prefill", lambda: suite.prefill(ref, gd, st, cfg, inputs)),
             ("batches", lambda: suite.batches(ref, gd, st, inputs)),
             ("per layer", lambda: suite.per_layer_cost(ref, model, inputs)),
             ("compile cache", suite.compile_cache)][:None if not args.smoke else -1]  # fresh processes: not in smoke
    for name, step in steps:
        t = time.perf_counter()
        step()
        print(f"  {name}: {time.perf_counter() - t:.0f} s, load {load()}", flush=True)
    md, data = report(suite, cfg, machine())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(md)
    (args.out / "bench.json").write_text(json.dumps(data, indent=1, default=str))
    print(md)
    return 0


def machine() -> dict:
    return dict(cpu=_cpu(), cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version())


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
