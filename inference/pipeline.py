"""Images + questions -> answers through any LLaVA or LLaVA-NeXT directory (HF or ours): the path `run` and every
eval share. LLaVA-NeXT images go through transformers' any-resolution processor (`LlavaNextImageProcessorPil`):
unpruned, each prompt carries its own image's token count; pruned, every prompt carries `keep`.

A method is one of `svdprune_jax.METHODS` (pruning between the vision tower and the projector), "fastv"
(pruning inside the language model at layer K) or "full" (no pruning), given as a method spec with its
options (`svdprune_jax.inference.methods`: "svd:energy=0.9:matrix=projector"). The budget `keep` is the number of image tokens
the language model reads (FastV: from layer K on; on LLaVA-NeXT image slots, `image_newline`s included). Adaptive
specs choose a budget per image
(`Pipeline.adaptive_keep`); each budget is then answered with the spec's fixed form (`MethodSpec.fixed`).
"""
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaNextImageProcessorPil

import svdprune_jax
from svdprune_jax import names
from svdprune_jax.inference.methods import MethodSpec, parse
from svdprune_jax.convert.checkpoint import load_model
from svdprune_jax.convert.hf_config import processor_path, tokenizer_path
from svdprune_jax.models import sharding, stack
from svdprune_jax.models.generate import Decoding, generate
from svdprune_jax.models.llama import FastV
from svdprune_jax.models.llava import GIVEN, LlavaConfig, adaptive_keep
from svdprune_jax.models.llava_next import LlavaNextConfig, layout

log = logging.getLogger(__name__)
METHODS = names.ANSWER_METHODS  # answer() also takes GIVEN, with the caller's scores
CHAT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation format


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]          # generated ids, EOS included when reached
    prompt_ids: list[int]         # the prompt's ids before the image token is expanded to the budget
    kept_indices: list[int] | None  # kept patch indices, ascending (pre-LLM methods), else None; LLaVA-NeXT: the
    # kept tokens' numbers among the image's tokens in packed order (base view, then the crops' rows)


@dataclasses.dataclass
class Pipeline:
    graphdef: nnx.GraphDef
    state: nnx.State
    config: LlavaConfig
    tokenizer: object
    processor: CLIPImageProcessorPil | LlavaNextImageProcessorPil
    mesh: Mesh | None = None  # runs sharded on it (`models.sharding`); batches must split over its `data` axis

    @classmethod
    def load(cls, model_dir: str | Path, dtype=None, mesh: Mesh | None = None) -> "Pipeline":
        """mesh: load every param straight into its shards on it and run sharded there."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir}: not a LLaVA model directory (no config.json)")
        # one weight buffer per layer: XLA:CPU copies dynamically indexed layer slices in the decode loop
        model = stack.per_layer(load_model(model_dir, dtype, mesh))
        graphdef, state = nnx.split(model)
        cfg = model.config
        next_ = isinstance(cfg, LlavaNextConfig)
        processor = (LlavaNextImageProcessorPil if next_ else CLIPImageProcessorPil).from_pretrained(
            processor_path(model_dir))
        if next_ and tuple(map(tuple, processor.image_grid_pinpoints)) != cfg.image_grid_pinpoints:
            raise ValueError(f"{model_dir}: the image processor's image_grid_pinpoints {processor.image_grid_pinpoints} "
                             f"differ from the model's {[list(p) for p in cfg.image_grid_pinpoints]}")
        return cls(graphdef, state, cfg, AutoTokenizer.from_pretrained(tokenizer_path(model_dir)), processor, mesh)

    @property
    def is_next(self) -> bool:
        return isinstance(self.config, LlavaNextConfig)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens of an image (LLaVA-NeXT: the most any image can have, newlines not counted)."""
        return self.config.num_image_tokens

    def image_token_counts(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Image tokens of each image before pruning (newlines not counted)."""
        if self.is_next:
            return self.pixel_values(images).counts
        return np.full(len(images), self.num_image_tokens)

    def spec(self, method: str | MethodSpec) -> MethodSpec:
        """A method spec (`svdprune_jax.inference.methods`), parsed when given as text."""
        return method if isinstance(method, MethodSpec) else parse(method, (*METHODS, GIVEN))

    def budget(self, method: str | MethodSpec, keep: int | None) -> int:
        """Image tokens the language model reads (adaptive specs: the most); checks the method spec at this
        budget against the model's feature sizes and the budget."""
        spec = self.spec(method)
        n = self.num_image_tokens
        if spec.method == "full":
            if keep not in (None, n):
                raise ValueError(f"method 'full' keeps all {n} image tokens, not {keep}")
            return n
        if keep is None or not 1 <= keep <= n:
            raise ValueError(f"keep {keep} outside [1, {n}] (the model's image tokens)")
        if spec.per_view and not self.is_next:
            raise ValueError(f"method spec {spec.text!r}: per_view needs a LLaVA-NeXT model (LLaVA-1.5 has one view)")
        cfg = self.config
        width = cfg.text.hidden_size if spec.matrix == "projector" else cfg.vision.hidden_size * cfg.num_feature_layers
        spec.check(n, width, keep)
        return keep

    def adaptive_keep(self, images: Sequence[Image.Image], method: str | MethodSpec, keep: int) -> np.ndarray:
        """Image tokens per image (B,) for an adaptive spec: the smallest of `svdprune_jax.budget_buckets(keep)`
        holding the spec's target share of each image's leverage mass (`svdprune_jax.adaptive_budget`)."""
        spec = self.spec(method)
        if spec.adaptive is None:
            raise ValueError(f"method spec {spec.text!r} is not adaptive (no adaptive=TARGET)")
        keep = self.budget(spec, keep)
        return np.asarray(adaptive_keep(self.graphdef, self.state, self.pixel_values(images), spec.adaptive,
                                        svdprune_jax.budget_buckets(keep), matrix=spec.matrix, rule=spec.rule()))

    def pixel_values(self, images: Sequence[Image.Image]):
        """The model's image input: pixel_values (B, C, H, W), or for LLaVA-NeXT its `AnyresImages`."""
        out = self.processor(images=list(images), return_tensors="np")
        px = np.asarray(out["pixel_values"], np.float32)
        return layout(self.config, px, out["image_sizes"]) if self.is_next else px

    def prompt_ids(self, question: str, template: str = CHAT_TEMPLATE) -> list[int]:
        check_template(template)
        ids = self.tokenizer(template.format(question=question))["input_ids"]
        if ids.count(self.config.image_token_id) != 1:
            raise ValueError(f"the prompt template must hold exactly one image token: {template!r}")
        return ids

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], *, method: str | MethodSpec = "svd",
               keep: int | None = None, max_new_tokens: int = 16, template: str = CHAT_TEMPLATE,
               key: jax.Array | None = None, scores: np.ndarray | None = None, timed: bool = False
               ) -> tuple[list[Answer], dict[str, float]]:
        """Greedy answers for a batch (one image per question), and the stage timings when `timed`.
        method: a method spec (text or parsed), not adaptive: one budget per call.
        scores (B, N): per-token scores for method GIVEN, which keeps the `keep` highest of each image."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        spec = self.spec(method)
        if spec.adaptive is not None:
            raise ValueError(f"method spec {spec.text!r} chooses a budget per image: get them with adaptive_keep "
                             "and answer each budget with the spec's fixed form (MethodSpec.fixed())")
        budget = self.budget(spec, keep)
        method = spec.method
        in_llm = method in ("full", "fastv")
        prompts = [self.prompt_ids(q, template) for q in questions]
        pixels = self.pixel_values(images)
        # every image token reaches the language model for full and fastv: LLaVA-NeXT's each image's own count
        # (newlines included), LLaVA-1.5's all N
        slots = np.full(len(prompts), self.num_image_tokens if in_llm else budget)
        if in_llm and self.is_next:
            slots = pixels.lengths
        ids, mask = left_pad([expand(p, self.config.image_token_id, int(n)) for p, n in zip(prompts, slots)],
                             self.tokenizer.pad_token_id or 0)
        if method == "random" and key is None:
            key = jax.random.key(0)
        out = generate(self.graphdef, self.state, pixels, ids, mask,
                       decoding=Decoding(max_new_tokens, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id or 0),
                       pruning=None if in_llm else spec.pruning(budget),
                       fastv=FastV(budget) if method == "fastv" else None, key=key, scores=scores, timed=timed,
                       mesh=self.mesh)
        # on a mesh spanning several processes each holds only its rows: gathered here, the answers merged
        tokens, lengths = sharding.to_host(out.tokens), sharding.to_host(out.lengths)
        kept = None if out.kept is None else sharding.to_host(out.kept)
        answers = []
        for i, prompt in enumerate(prompts):
            generated = tokens[i, :lengths[i]].tolist()
            answers.append(Answer(self.tokenizer.decode(generated, skip_special_tokens=True).strip(), generated,
                                  prompt, None if kept is None else kept[i].tolist()))
        return answers, out.timings


def check_template(template: str) -> None:
    """A prompt template must place the question; its image token is checked against the tokenizer in `prompt_ids`."""
    if "{question}" not in template:
        raise ValueError(f"the prompt template must hold {{question}}: {template!r}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as e:  # {foo}, {0}, a lone brace
        raise ValueError(f"the prompt template may hold no field but {{question}} (write {{{{ and }}}} for "
                         f"braces): {template!r} ({type(e).__name__}: {e})") from None


def expand(prompt_ids: list[int], image_token_id: int, n: int) -> list[int]:
    """The single image token of a prompt repeated n times (one slot per image embedding)."""
    at = prompt_ids.index(image_token_id)
    return prompt_ids[:at] + [image_token_id] * n + prompt_ids[at + 1:]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask
