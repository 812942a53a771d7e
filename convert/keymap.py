"""The one table between transformers LLaVA (and LLaVA-NeXT) tensor keys and our parameter tree, read in both directions.

Each rule names an HF key (after its model part's prefix; "{i}" is a layer index), our param path and the
transform between the two. A rule with "{i}" fills one slice of a param stacked on its leading axis.
"""
import dataclasses
import functools
import re
from collections import defaultdict

import numpy as np

from svdprune_jax.convert.safetensors_io import DTYPES, Tensor

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """An axis permutation taking the HF tensor to ours (None: as is); its inverse takes ours back."""
    name: str
    axes: tuple[int, ...] | None = None

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return x if self.axes is None else x.transpose(self.axes)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x if self.axes is None else x.transpose(np.argsort(self.axes))

    def shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Our shape for an HF shape; None when the rank does not fit the permutation."""
        if self.axes is None:
            return tuple(hf_shape)
        return tuple(hf_shape[a] for a in self.axes) if len(hf_shape) == len(self.axes) else None


IDENTITY = Transform("identity")
LINEAR = Transform("linear_transpose", (1, 0))  # torch Linear weight (out, in) -> kernel (in, out)
CONV = Transform("conv_oihw_to_hwio", (2, 3, 1, 0))

# Key prefixes of each model part in the wild: the hub's legacy layout first (export writes it), then what
# transformers 5 save_pretrained writes (no vision_model), then model.state_dict() of transformers 4.5x and 5.
PREFIXES = {
    "vision": ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
               "model.vision_tower."),
    "projector": ("multi_modal_projector.", "model.multi_modal_projector."),
    "text": ("language_model.model.", "model.language_model."),
    "head": ("language_model.lm_head.", "lm_head."),
    "newline": ("", "model."),  # LLaVA-NeXT's image_newline: top level on the hub, under model. in transformers 5
}


@dataclasses.dataclass(frozen=True)
class Rule:
    part: str  # a key of PREFIXES
    hf: str  # HF key after the prefix, "{i}" for a layer index
    ours: Path | None  # our param path; None: skipped on purpose (LLaVA never uses it)
    transform: Transform = IDENTITY

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_key(self, i: int | None = None) -> str:
        """The legacy-layout key (layer i for a stacked rule)."""
        return PREFIXES[self.part][0] + self.hf.format(i=i)

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        prefix = "|".join(map(re.escape, PREFIXES[self.part]))
        return re.compile(f"(?:{prefix}){re.escape(self.hf).replace(re.escape('{i}'), '([0-9]+)')}")


def _rule(part: str, hf: str, ours: str | None, transform: Transform = IDENTITY) -> Rule:
    return Rule(part, hf, None if ours is None else tuple(ours.split("/")), transform)


def _linear(part: str, hf: str, ours: str) -> list[Rule]:
    return [_rule(part, f"{hf}.weight", f"{ours}/kernel", LINEAR), _rule(part, f"{hf}.bias", f"{ours}/bias")]


def _layer_norm(part: str, hf: str, ours: str | None) -> list[Rule]:
    return [_rule(part, f"{hf}.weight", ours and f"{ours}/scale"), _rule(part, f"{hf}.bias", ours and f"{ours}/bias")]


_VL, _TL = "encoder.layers.{i}", "layers.{i}"
RULES: tuple[Rule, ...] = (
    _rule("vision", "embeddings.class_embedding", "vision_tower/embeddings/class_embedding"),
    _rule("vision", "embeddings.patch_embedding.weight", "vision_tower/embeddings/patch_embedding/kernel", CONV),
    _rule("vision", "embeddings.position_embedding.weight", "vision_tower/embeddings/position_embedding/embedding"),
    *_layer_norm("vision", "pre_layrnorm", "vision_tower/pre_layrnorm"),
    *_layer_norm("vision", f"{_VL}.layer_norm1", "vision_tower/layers/layer_norm1"),
    *_layer_norm("vision", f"{_VL}.layer_norm2", "vision_tower/layers/layer_norm2"),
    *(r for p in ("q_proj", "k_proj", "v_proj", "out_proj")
      for r in _linear("vision", f"{_VL}.self_attn.{p}", f"vision_tower/layers/self_attn/{p}")),
    *(r for p in ("fc1", "fc2") for r in _linear("vision", f"{_VL}.mlp.{p}", f"vision_tower/layers/mlp/{p}")),
    *_layer_norm("vision", "post_layernorm", None),
    *(r for p in ("linear_1", "linear_2") for r in _linear("projector", p, f"multi_modal_projector/{p}")),
    _rule("text", "embed_tokens.weight", "language_model/embed_tokens/embedding"),
    _rule("text", f"{_TL}.input_layernorm.weight", "language_model/layers/input_layernorm/scale"),
    _rule("text", f"{_TL}.post_attention_layernorm.weight", "language_model/layers/post_attention_layernorm/scale"),
    *(r for p in ("q_proj", "k_proj", "v_proj", "o_proj")
      for r in _linear("text", f"{_TL}.self_attn.{p}", f"language_model/layers/self_attn/{p}")),
    *(r for p in ("gate_proj", "up_proj", "down_proj")
      for r in _linear("text", f"{_TL}.mlp.{p}", f"language_model/layers/mlp/{p}")),
    _rule("text", "norm.weight", "language_model/norm/scale"),
    _rule("head", "weight", "lm_head/kernel", LINEAR),
    _rule("newline", "image_newline", "image_newline"),
)
BY_PATH: dict[Path, Rule] = {r.ours: r for r in RULES if r.ours is not None}


def match(key: str) -> tuple[Rule, int | None] | None:
    """(rule, layer index or None) for an HF key in any known layout; None for a key no rule knows."""
    for rule in RULES:
        if m := rule.pattern.fullmatch(key):
            return rule, int(m.group(1)) if rule.stacked else None
    return None


def canonical_key(key: str) -> str:
    """The legacy-layout spelling of a known HF key (ValueError for an unknown one)."""
    if (hit := match(key)) is None:
        raise ValueError(f"unknown LLaVA tensor key {key!r}")
    return hit[0].hf_key(hit[1])


_FLOATS = {np.dtype(DTYPES[c]) for c in ("F64", "F32", "F16", "BF16")}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which HF tensors fill each of our params (stacked params: one per layer, in order), and which tensors
    were skipped on purpose (by legacy key, with the reason)."""
    sources: dict[Path, list[tuple[str, Tensor]]]
    skipped: dict[str, tuple[Tensor, str]]

    def summary(self) -> str:
        reasons = defaultdict(int)
        for _, why in self.skipped.values():
            reasons[why] += 1
        n = sum(len(s) for s in self.sources.values())
        return f"{n} tensors -> {len(self.sources)} params" + "".join(
            f"; skipped {k} tensor(s): {why}" for why, k in reasons.items())


def plan(tensors: dict[str, Tensor], shapes: dict[Path, tuple[int, ...]], vision_layers: int) -> Plan:
    """Match every HF tensor to a slot of our params and check shapes and dtypes, or raise one ValueError
    listing every unknown key, missing param, duplicate, wrong shape and non-float tensor.

    shapes: our flat param shapes (path -> shape), from the abstract model. vision_layers: the HF config's
    vision depth (layers from the tower's held depth up to it are skipped on purpose; deeper ones are unknown)."""
    found, skipped, errors = {}, {}, defaultdict(list)
    for key, t in tensors.items():
        if (hit := match(key)) is None:
            errors["unknown keys"].append(key)
            continue
        rule, i = hit
        if rule.ours is None:
            skipped[rule.hf_key(i)] = (t, f"{rule.hf.rsplit('.', 1)[0]} (unused by LLaVA)")
            continue
        if rule.ours not in shapes:
            errors["unknown keys"].append(f"{key} (the model has no {'/'.join(rule.ours)}: check the config's biases "
                                          "and tie_word_embeddings)")
            continue
        want = shapes[rule.ours]
        if rule.stacked and i >= want[0]:
            if rule.part == "vision" and i < vision_layers:
                skipped[rule.hf_key(i)] = (t, f"vision layers past vision_feature_layer (tower holds {want[0]})")
            else:
                errors["unknown keys"].append(f"{key} (layer {i}; the model has {want[0]})")
            continue
        if (rule.ours, i) in found:
            errors["duplicate keys"].append(f"{key} and {found[rule.ours, i][0]}")
            continue
        found[rule.ours, i] = (key, t)
        got, need = rule.transform.shape(t.shape), want[1:] if rule.stacked else want
        if got != need:
            errors["wrong shapes"].append(f"{key} {list(t.shape)} ({rule.transform.name}) -> {list(got or [])}, "
                                          f"{'/'.join(rule.ours)} needs {list(need)}")
        if t.dtype not in _FLOATS:
            errors["non-float tensors"].append(f"{key} ({t.dtype})")
    sources = {}
    for path, shape in shapes.items():
        rule = BY_PATH.get(path)
        if rule is None:
            errors["params no rule fills (models/ and convert/keymap.py disagree)"].append("/".join(path))
            continue
        slots = range(shape[0]) if rule.stacked else [None]
        lost = [i for i in slots if (path, i) not in found]
        if lost:
            errors["missing params"].append("/".join(path) + (f" layers {lost}" if rule.stacked else "") +
                                            f" (HF {rule.hf_key('{i}' if rule.stacked else None)})")
        else:
            sources[path] = [found[path, i] for i in slots]
    if errors:
        raise ValueError("checkpoint does not fit the model:\n" + "\n".join(
            f"  {kind} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items) for kind, items in errors.items()))
    return Plan(sources, skipped)
