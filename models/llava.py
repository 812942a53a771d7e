"""LLaVA-1.5 (transformers' `LlavaForConditionalGeneration`), Flax NNX, with vision-token pruning.

One image per prompt. The image path: CLIP tower up to `vision_feature_layer` -> select strategy ->
optional `svdprune_jax.prune` (static method and k, kept tokens in spatial order) -> projector -> written
into the prompt's image-token slots. The prompt carries exactly as many image tokens as features survive.
"""
import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

import svdprune_jax
from svdprune_jax.models.cache import KVCache
from svdprune_jax.models.clip import CLIP_VIT_L_14_336, CLIPVisionConfig, CLIPVisionTower, feature_layers
from svdprune_jax.models.layers import activation, linear
from svdprune_jax.models.llama import FastV, Llama, LlamaConfig
from svdprune_jax.models import sharding


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: CLIPVisionConfig
    text: LlamaConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self):
        if not isinstance(self.vision_feature_layer, numbers.Integral):  # lists from JSON -> hashable tuple
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        feature_layers(self.vision_feature_layer, self.vision.num_hidden_layers)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} "
                             "is not 'default' or 'full'")
        activation(self.projector_hidden_act)
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside the vocabulary [0, {self.text.vocab_size})")

    @property
    def num_image_tokens(self) -> int:
        """Image features per image before pruning: patches, plus CLS for the 'full' strategy."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def num_feature_layers(self) -> int:
        return 1 if isinstance(self.vision_feature_layer, numbers.Integral) else len(self.vision_feature_layer)

    MODEL_TYPE = "llava"  # config.json's model_type (a class attribute, not a field)

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        """From a transformers LlavaConfig `to_dict()` or a llava-hf config.json."""
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            raise ValueError(f"model_type {d['model_type']!r} is not {cls.MODEL_TYPE}")
        return cls(**cls.hf_fields(d))

    @classmethod
    def hf_fields(cls, d: dict) -> dict:
        """This class's fields from a config.json dict (subclasses add theirs)."""
        text = dict(d.get("text_config") or {})
        # transformers keeps the tie flag at the top level; older files carry it in text_config.
        text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        return dict(
            vision=CLIPVisionConfig.from_hf(d.get("vision_config") or {}),
            text=LlamaConfig.from_hf(text),
            image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=d.get("multimodal_projector_bias", True),
        )


def _vicuna(hidden, intermediate, layers, heads) -> LlamaConfig:
    return LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)


# llava-hf/llava-1.5-7b-hf and -13b-hf geometry (Vicuna-1.5 decoders, CLIP ViT-L/14-336, 576 image tokens).
LLAVA_15_7B = LlavaConfig(vision=CLIP_VIT_L_14_336, text=_vicuna(4096, 11008, 32, 32), image_token_id=32000)
LLAVA_15_13B = LlavaConfig(vision=CLIP_VIT_L_14_336, text=_vicuna(5120, 13824, 40, 40), image_token_id=32000)


GIVEN = "given"  # Pruning method: the top k of per-token scores the caller hands in (not a svdprune_jax method)
# Which N x D matrix pruning scores: the tower's selected-layer output (the paper's choice) or the projector's output.
MATRICES = ("tower", "projector")


@dataclasses.dataclass(frozen=True)
class Pruning:
    """Static pruning choice: `svdprune_jax.prune(features, k, method, **dict(options))`, which checks it, on the
    `matrix` features (`MATRICES`)."""
    method: str
    k: int
    options: tuple[tuple[str, Any], ...] = ()  # static options only (no arrays): hashed into the jit cache
    matrix: str = "tower"
    # LLaVA-NeXT: each view (base, crops) scored alone with a share of k (`prune`'s per_group), not one selection
    # over the image. LLaVA-1.5 has one view: both are the same selection.
    per_view: bool = False

    def __post_init__(self):
        if self.matrix not in MATRICES:
            raise ValueError(f"pruning matrix {self.matrix!r} is not one of {MATRICES}")


class LlavaMultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D = cfg.text.hidden_size
        kw = dict(use_bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(cfg.vision.hidden_size * cfg.num_feature_layers, D, ("embed", "mlp"), **kw)
        self.linear_2 = linear(D, D, ("mlp", "embed"), **kw)
        self.act = cfg.projector_hidden_act

    def __call__(self, x: Float[Array, "B N Dv"]) -> Float[Array, "B N D"]:
        return self.linear_2(activation(self.act)(self.linear_1(x)))


class Llava(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        depth, _ = feature_layers(cfg.vision_feature_layer, cfg.vision.num_hidden_layers)
        self.vision_tower = CLIPVisionTower(cfg.vision, depth, **kw)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg, **kw)
        self.language_model = Llama(cfg.text, **kw)
        self.lm_head = None if cfg.text.tie_word_embeddings else linear(
            cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

    def image_features(self, pixel_values: Float[Array, "B C H W"], *, cls_attention: bool = False):
        """Selected vision features (B, N, Dv * layers); with `cls_attention` also the head-averaged attention
        (B, N) of the CLS query to those N tokens in the deepest selected layer."""
        cfg = self.config
        out = self.vision_tower(pixel_values, cfg.vision_feature_layer, return_attention=cls_attention)
        feats, probs = out if cls_attention else (out, None)
        first = int(cfg.vision_feature_select_strategy == "default")  # "default" drops CLS
        cls_attn = None if probs is None else probs[:, :, 0, first:].mean(axis=1)
        return feats[:, first:], cls_attn

    def scored_features(self, pixel_values: Float[Array, "B C H W"], matrix: str = "tower", *,
                        cls_attention: bool = False):
        """The (B, N, Dm) matrix pruning scores (`MATRICES`; `image_features` or its projection), and the
        CLS attention as `image_features` gives it."""
        feats, cls_attn = self.image_features(pixel_values, cls_attention=cls_attention)
        return (self.multi_modal_projector(feats) if matrix == "projector" else feats), cls_attn

    def scored_tokens(self, pixel_values, matrix: str = "tower", *, cls_attention: bool = False):
        """(the matrix one selection scores (B, N, Dm), its valid-token mask (B, N) or None for all, CLS attention):
        `scored_features` here; LLaVA-NeXT's image tokens in packed order, its padding masked."""
        feats, cls_attn = self.scored_features(pixel_values, matrix, cls_attention=cls_attention)
        return feats, None, cls_attn

    def encode_images(self, pixel_values: Float[Array, "B C H W"], pruning: Pruning | None = None,
                      key: jax.Array | None = None, scores: Float[Array, "B N"] | None = None):
        """Projected image embeddings (B, k, D) and kept token indices (B, k) into the N features (None unpruned).
        Method GIVEN keeps the k highest of the caller's per-token `scores` (an oracle's, in evaluations).
        With `pruning.matrix` "projector" all N tokens are projected and scored, and the kept rows are the
        projector's outputs: the projector acts per token, so this is what projecting the kept tokens gives."""
        needs_attn = pruning is not None and pruning.method in svdprune_jax.NEEDS_CLS_ATTENTION
        matrix = "tower" if pruning is None else pruning.matrix
        feats, cls_attn = self.scored_features(pixel_values, matrix, cls_attention=needs_attn)
        # each device scores and prunes its own images: no image crosses the data axis
        feats = sharding.constrain(feats, "batch", None, None)
        kept = None
        if pruning is not None and pruning.method == GIVEN:
            kept = svdprune_jax.select_tokens(scores, pruning.k, sharding.DATA)
            feats = svdprune_jax.gather_tokens(feats, kept)
        elif pruning is not None:
            feats, kept = svdprune_jax.prune(feats, pruning.k, pruning.method, key=key, cls_attention=cls_attn,
                                             batch_axis=sharding.DATA, **dict(pruning.options))
        return (feats if matrix == "projector" else self.multi_modal_projector(feats)), kept

    def prompt_budget(self, pixel_values, pruning: Pruning | None) -> int | np.ndarray:
        """Image tokens each prompt must carry: the budget k, or every image feature unpruned."""
        return self.config.num_image_tokens if pruning is None else pruning.k

    def image_slots(self, pixel_values, pruning: Pruning | None) -> int:
        """Image embeddings `encode_images` gives per image (static): the most image tokens a prompt can carry."""
        return self.prompt_budget(pixel_values, pruning)

    def embed(self, input_ids: Int[Array, "B T"], image_embeds: Float[Array, "B n D"]) -> Float[Array, "B T D"]:
        """Token embeddings with the i-th image token of each row replaced by its i-th image embedding
        (running count of image tokens as the gather index: static shapes; counts checked by `check_prompts`)."""
        x = self.language_model.embed_tokens(input_ids)
        is_img = input_ids == self.config.image_token_id
        slot = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, image_embeds.shape[1] - 1)
        feats = jnp.take_along_axis(image_embeds, slot[..., None], axis=1)
        return jnp.where(is_img[..., None], feats.astype(x.dtype), x)

    def image_positions(self, input_ids: Int[Array, "B T"], n: int) -> Int[Array, "B n"]:
        """Columns of the image tokens of each row (FastV's candidates), n = the image slots (`image_slots`); a row
        with fewer (LLaVA-NeXT) fills the rest with T, past every column."""
        T = input_ids.shape[1]
        find = lambda row: jnp.nonzero(row == self.config.image_token_id, size=n, fill_value=T)[0]
        return jax.vmap(find)(input_ids).astype(jnp.int32)

    def logits(self, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
        return self.language_model.unembed(h, self.lm_head)

    def __call__(self, pixel_values: Float[Array, "B C H W"], input_ids: Int[Array, "B T"],
                 attention_mask: Int[Array, "B T"] | None = None, *, pruning: Pruning | None = None,
                 fastv: FastV | None = None, key: jax.Array | None = None):
        """Logits (B, T', V) of a left-padded batch (no cache); see `forward` for the checked entry point.

        Returns (logits, kept image-token indices (B, k) or None, kept prompt columns (B, T') with FastV or None).
        """
        image_embeds, kept = self.encode_images(pixel_values, pruning, key)
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask
        h, _, columns = self.run_prompt(input_ids, mask, image_embeds, fastv=fastv)
        return self.logits(h), kept, columns

    def run_prompt(self, input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"],
                   image_embeds: Float[Array, "B n D"], *, cache: KVCache | None = None,
                   fastv: FastV | None = None):
        """The language model over a left-padded prompt with its image embeddings in place (prefill when
        `cache` is given): `Llama.__call__`'s (hidden, cache, kept columns)."""
        mask = attention_mask.astype(bool)
        image_positions = None if fastv is None else self.image_positions(input_ids, image_embeds.shape[1])
        return self.language_model(self.embed(input_ids, image_embeds), positions(mask), mask, cache=cache,
                                   fastv=fastv, image_positions=image_positions)


def positions(mask: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Contiguous positions per row, 0 at the first real token (padding gets 0), as transformers' generate."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def check_prompts(cfg: LlavaConfig, input_ids, attention_mask, budget: int | np.ndarray):
    """Concrete-input checks that cannot run under jit: ids in the vocabulary, left padding only, exactly
    `budget` image tokens (one count, or one per row) in the real part of every row."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same (B, T)")
    if ids.min() < 0 or ids.max() >= cfg.text.vocab_size:
        raise ValueError(f"input_ids outside the vocabulary [0, {cfg.text.vocab_size})")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any() or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding: zeros then ones, last column real in every row")
    if cfg.text.sliding_window is not None and mask.sum(axis=1).max() > cfg.text.sliding_window:
        raise ValueError(f"prompt of {mask.sum(axis=1).max()} tokens exceeds the sliding window of "
                         f"{cfg.text.sliding_window} (attending to the whole sequence would differ)")
    counts = ((ids == cfg.image_token_id) & mask).sum(axis=1)
    if (counts != budget).any() or ((ids == cfg.image_token_id) & ~mask).any():
        budget = budget.tolist() if isinstance(budget, np.ndarray) else budget
        raise ValueError(f"image tokens per prompt {counts.tolist()} differ from the image budget {budget}")


def fastv_width(model: "Llava", pixel_values, attention_mask, pruning: Pruning | None, fastv: FastV | None,
                budget: int | np.ndarray) -> int:
    """The fewest prompt columns a FastV batch needs (0 without FastV), after checking FastV against the prompts
    (`check_prompts`-checked, `budget` image tokens each). After layer K every row keeps fastv.keep image tokens,
    and a row holding n_b of the S image slots (LLaVA-NeXT: images differ in token count) also drops its first
    S - n_b columns, so that every row has one static length; those columns must be left padding."""
    if fastv is None:
        return 0
    budget = np.broadcast_to(budget, np.shape(attention_mask)[:1])
    fastv.check(model.config.text, int(budget.min()))
    text = np.asarray(attention_mask).astype(bool).sum(axis=1) - budget
    return model.image_slots(pixel_values, pruning) + int(text.max())


def forward(graphdef: nnx.GraphDef, state: nnx.State, pixel_values, input_ids, attention_mask=None, *,
            pruning: Pruning | None = None, fastv: FastV | None = None, key: jax.Array | None = None,
            mesh: Mesh | None = None):
    """Checked, jitted `Llava.__call__` on a split model: (logits (B, T', V), kept indices, kept columns).
    With FastV the prompts need `fastv_width` columns (LLaVA-NeXT: left padding; `generate` pads itself).
    mesh: run sharded on it (`state` laid out on it, the batch split over `data`; see `models.sharding`)."""
    model = nnx.merge(graphdef, state)
    budget = model.prompt_budget(pixel_values, pruning)
    check_prompts(model.config, input_ids, attention_mask, budget)
    mask = np.ones(np.shape(input_ids), bool) if attention_mask is None else attention_mask
    width = fastv_width(model, pixel_values, mask, pruning, fastv, budget)
    if np.shape(input_ids)[1] < width:
        raise ValueError(f"FastV on this batch needs prompts of at least {width} columns (left-padded: a row with "
                         f"fewer image tokens than the others drops that many leading columns at layer K); got "
                         f"{np.shape(input_ids)[1]}")
    if mesh is not None:
        pixel_values, input_ids, attention_mask = sharding.put_batch(mesh, pixel_values, input_ids, attention_mask)
    with sharding.use(mesh):
        return _forward(graphdef, state, pixel_values, input_ids, attention_mask, key, pruning=pruning, fastv=fastv)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("pruning", "fastv"))
def _forward(graphdef, state, pixel_values, input_ids, attention_mask, key, *, pruning, fastv):
    return nnx.merge(graphdef, state)(pixel_values, input_ids, attention_mask, pruning=pruning, fastv=fastv, key=key)


def adaptive_keep(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Float[Array, "B C H W"], target: float,
                  buckets: tuple[int, ...], *, matrix: str = "tower", rule: tuple[tuple[str, Any], ...] = ()
                  ) -> Int[Array, "B"]:
    """Image tokens to keep per image: `svdprune_jax.adaptive_budget` (leverage rank rule `rule`: rank or
    energy, center, solver) on the `matrix` features of each image's own tokens (`Llava.scored_tokens`: LLaVA-NeXT's
    padding masked out), jitted on a split model."""
    if matrix not in MATRICES:
        raise ValueError(f"pruning matrix {matrix!r} is not one of {MATRICES}")
    return _adaptive_keep(graphdef, state, pixel_values, target=target, buckets=buckets, matrix=matrix, rule=rule)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("target", "buckets", "matrix", "rule"))
def _adaptive_keep(graphdef, state, pixel_values, *, target, buckets, matrix, rule):
    tokens, mask, _ = nnx.merge(graphdef, state).scored_tokens(pixel_values, matrix)
    return svdprune_jax.adaptive_budget(tokens, target, buckets, mask=mask, **dict(rule))
