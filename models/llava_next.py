"""LLaVA-NeXT (transformers' `LlavaNextForConditionalGeneration`, LLaVA-1.6), Flax NNX, with vision-token pruning.

LLaVA-1.5's network (`models.llava.Llava`: CLIP tower, projector, LLaMA decoder, generation) plus the learned
`image_newline` and the any-resolution image path (`models.anyres`): every view (the base image and its
crops) through the tower, the tokens gathered into transformers' packed order (base view; unpadded crop grid
row by row, one `image_newline` after each row).

Pruning (`Pruning`, static k) acts on the image tokens of the packed sequence, newlines excluded:
  one selection (default): `svdprune_jax.prune` over all of an image's tokens (the base view's and the
      unpadded crops'; padding masked out), so the views compete for the k slots;
  per view (`Pruning(per_view=True)`): each view scored alone on its own tokens, keeping a share of k in
      proportion to its token count (`svdprune_jax.groups.group_budgets`).
The k kept tokens reach the language model in packed order (base view first, then the crops' rows), and no
`image_newline`: a row of kept tokens is no longer a row of the image, and dropping them makes every pruned
image exactly k tokens whatever its grid, so the language model's sequence (and its program) is the same for
every aspect ratio. Unpruned, each image fills its own number of prompt slots, as in transformers.

FastV (in the language model) ranks every image slot of the prompt, `image_newline`s included (after layer K
they are contextual states like the rest), and keeps `keep` in every row; a row with fewer image slots than the
batch's bound (`image_slots`) also drops that many leading padding columns, so the layers after K have one length.

`models.llava.forward` and `models.generate.generate` run it unchanged, with `layout(...)` (an
`anyres.AnyresImages`) in place of pixel_values: one program per (view count, prompt bucket, pruning), the grid
and aspect ratio being data.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

import svdprune_jax
from svdprune_jax.models import anyres, sharding
from svdprune_jax.models.llava import GIVEN, LLAVA_15_7B, LLAVA_15_13B, Llava, LlavaConfig, Pruning
from svdprune_jax.models.sharding import axes
from svdprune_jax.select import top_k_indices

# transformers' LlavaNextConfig default (llava-hf/llava-v1.6-* ship it): (height, width) pinpoints.
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    image_grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS

    MODEL_TYPE = "llava_next"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(int(x) for x in p) for p in self.image_grid_pinpoints))
        if self.vision_feature_select_strategy != "default":
            # transformers arranges each crop's features as a (side x side) grid: a CLS token does not fit in it
            raise ValueError("LLaVA-NeXT needs vision_feature_select_strategy 'default' (crops are patch grids)")
        s = self.vision.image_size
        if not self.image_grid_pinpoints or any(len(p) != 2 or min(p) < s or p[0] % s or p[1] % s
                                                for p in self.image_grid_pinpoints):
            raise ValueError(f"image_grid_pinpoints {self.image_grid_pinpoints} must be (height, width) pairs, "
                             f"multiples of the tower's image_size {s}")

    @classmethod
    def hf_fields(cls, d: dict) -> dict:
        return super().hf_fields(d) | dict(image_grid_pinpoints=d.get("image_grid_pinpoints") or PINPOINTS)

    @property
    def side(self) -> int:
        """Patch tokens per side of one view."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def bounds(self) -> tuple[int, int, int]:
        """(most views, most image tokens, most prompt slots incl. newlines) of an image (`anyres.bounds`)."""
        return anyres.bounds(self.image_grid_pinpoints, self.vision.image_size, self.side)

    @property
    def num_image_tokens(self) -> int:
        """The most image tokens (newlines not counted) an image can have: the bound budgets are checked
        against and the width of per-token `scores`."""
        return self.bounds[1]


# llava-hf/llava-v1.6-vicuna-7b-hf and -13b-hf geometry: LLaVA-1.5's tower and decoders, the default pinpoints
# (up to 5 views, 2,880 image tokens + 48 newlines).
LLAVA_NEXT_VICUNA_7B = LlavaNextConfig(**{f.name: getattr(LLAVA_15_7B, f.name) for f in dataclasses.fields(LlavaConfig)})
LLAVA_NEXT_VICUNA_13B = LlavaNextConfig(**{f.name: getattr(LLAVA_15_13B, f.name) for f in dataclasses.fields(LlavaConfig)})
CONFIGS = {cls.MODEL_TYPE: cls for cls in (LlavaConfig, LlavaNextConfig)}


def config_from_hf(d: dict) -> LlavaConfig:
    """LlavaConfig or LlavaNextConfig, by the config.json's model_type."""
    kind = d.get("model_type", LlavaConfig.MODEL_TYPE)
    if kind not in CONFIGS:
        raise ValueError(f"model_type {kind!r} is not one of {', '.join(CONFIGS)}")
    return CONFIGS[kind].from_hf(d)


def model_class(cfg: LlavaConfig) -> type[Llava]:
    return LlavaNext if isinstance(cfg, LlavaNextConfig) else Llava


def layout(cfg: LlavaNextConfig, pixel_values: np.ndarray, image_sizes) -> anyres.AnyresImages:
    """The device input for the processor's (pixel_values (B, V, C, s, s), image_sizes (B, 2) as (H, W))."""
    v = cfg.vision
    if np.ndim(pixel_values) != 5 or tuple(np.shape(pixel_values)[2:]) != (v.num_channels, v.image_size, v.image_size):
        raise ValueError(f"pixel_values shape {np.shape(pixel_values)} does not match (B, views, "
                         f"{v.num_channels}, {v.image_size}, {v.image_size})")
    return anyres.layout(np.asarray(pixel_values), image_sizes, cfg.image_grid_pinpoints, v.image_size, cfg.side)


class LlavaNext(Llava):
    def __init__(self, cfg: LlavaNextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        D = cfg.text.hidden_size
        self.image_newline = nnx.Param(jax.random.normal(rngs.params(), (D,), param_dtype) * D ** -0.5,
                                       **axes("embed"))

    def view_features(self, images: anyres.AnyresImages, *, cls_attention: bool = False):
        """Every view's selected features (B, V * N, Dv), view-major, and with `cls_attention` each view's CLS
        attention to its own N patches (B, V * N)."""
        px = images.pixel_values
        B, V = px.shape[:2]
        feats, cls_attn = self.image_features(px.reshape(B * V, *px.shape[2:]), cls_attention=cls_attention)
        flat = lambda a: None if a is None else a.reshape(B, V * a.shape[1], *a.shape[2:])
        return flat(feats), flat(cls_attn)

    def scored_features(self, images: anyres.AnyresImages, matrix: str = "tower", *, cls_attention: bool = False):
        """Every view's `matrix` features (B, V * N, Dm), view-major, and each view's CLS attention (B, V * N)."""
        feats, cls_attn = self.view_features(images, cls_attention=cls_attention)
        if matrix == "projector":
            feats = self.multi_modal_projector(feats)
        return sharding.constrain(feats, "batch", None, None), cls_attn  # each device prunes its own images

    def scored_tokens(self, images: anyres.AnyresImages, matrix: str = "tower", *, cls_attention: bool = False):
        """The image tokens in packed order (B, T, Dm), their mask (B, T) (T is the config's bound) and CLS
        attention (B, T) or None."""
        feats, cls_attn = self.scored_features(images, matrix, cls_attention=cls_attention)
        cls_attn = None if cls_attn is None else _take(cls_attn, images.tokens)
        return _take(feats, images.tokens), images.token_mask, cls_attn

    def encode_images(self, images: anyres.AnyresImages, pruning: Pruning | None = None, key: jax.Array | None = None,
                      scores: Float[Array, "B T"] | None = None):
        """Image embeddings and kept indices. Unpruned: (B, L, D) in transformers' packed order (each image's
        `lengths` slots real, the rest padding), kept None. Pruned: (B, k, D) and kept (B, k), the kept tokens'
        numbers among the image's tokens (packed order, newlines not counted), ascending (VisionZip: its own
        order). Method GIVEN keeps the k highest of the caller's per-token `scores` (B, T)."""
        needs_attn = pruning is not None and pruning.method in svdprune_jax.NEEDS_CLS_ATTENTION
        matrix = "tower" if pruning is None else pruning.matrix
        if pruning is not None and pruning.per_view and pruning.method != GIVEN:
            feats, cls_attn = self.scored_features(images, matrix, cls_attention=needs_attn)
            tokens, kept = self._prune_per_view(feats, cls_attn, images, pruning, key)
            return (tokens if matrix == "projector" else self.multi_modal_projector(tokens)), kept
        tokens, mask, cls_attn = self.scored_tokens(images, matrix, cls_attention=needs_attn)
        if pruning is None:
            embeds = self.multi_modal_projector(tokens)
            newline = jnp.broadcast_to(self.image_newline[...].astype(embeds.dtype), (embeds.shape[0], 1, embeds.shape[2]))
            return _take(jnp.concatenate([embeds, newline], axis=1), images.packed), None
        if pruning.method == GIVEN:
            # padding scored -inf; the scores themselves were checked by the caller (`generate`: finite, (B, T))
            kept = top_k_indices(jnp.where(mask, scores, -jnp.inf), pruning.k, sharding.DATA)
            tokens = svdprune_jax.gather_tokens(tokens, kept)
        else:
            tokens, kept = svdprune_jax.prune(tokens, pruning.k, pruning.method, key=key, mask=mask,
                                              batch_axis=sharding.DATA, cls_attention=cls_attn, **dict(pruning.options))
        return (tokens if matrix == "projector" else self.multi_modal_projector(tokens)), kept

    def _prune_per_view(self, feats, cls_attn, images: anyres.AnyresImages, pruning: Pruning, key):
        """`prune` with per_group over the (B, V, N, Dm) views, tokens that unpadding drops masked; the kept
        tokens put back in packed order: (kept (B, k, Dm), their image-token numbers (B, k) ascending)."""
        B, V = images.pixel_values.shape[:2]
        T = images.tokens.shape[1]
        views = lambda a: a.reshape(B, V, -1, *a.shape[2:])
        kept, idx = svdprune_jax.prune(
            views(feats), pruning.k, pruning.method, key=key, mask=views(images.position < T), per_group=True,
            cls_attention=None if cls_attn is None else views(cls_attn), batch_axis=sharding.DATA,
            **dict(pruning.options))
        numbers = jnp.take_along_axis(images.position, idx, axis=1)
        order = jnp.argsort(numbers, axis=1)
        return jnp.take_along_axis(kept, order[..., None], axis=1), jnp.take_along_axis(numbers, order, axis=1)

    def prompt_budget(self, images: anyres.AnyresImages, pruning: Pruning | None) -> int | np.ndarray:
        """k pruned (checked against the batch's images on the host); unpruned each image's own slot count
        (image tokens + newlines)."""
        if pruning is None:
            return np.asarray(images.lengths)
        fewest = int(images.counts.min())
        if not 1 <= pruning.k <= fewest:
            raise ValueError(f"k={pruning.k} outside [1, {fewest}] (the fewest image tokens in this batch)")
        if pruning.per_view and pruning.method == "visionzip":
            raise ValueError("visionzip merges its contextual tokens over the whole image: it has no per-view mode")
        return pruning.k

    def image_slots(self, images: anyres.AnyresImages, pruning: Pruning | None) -> int:
        """k pruned; unpruned the most slots (tokens + newlines) an image of this view count fills (`layout`)."""
        return self.prompt_budget(images, pruning) if pruning is not None else int(np.shape(images.packed)[1])


def _take(a, idx):
    """Rows `idx` (B, n) of a (B, M, D) or (B, M) array."""
    return jnp.take_along_axis(a, idx[..., None] if a.ndim == 3 else idx, axis=1)
