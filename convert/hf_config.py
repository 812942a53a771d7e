"""config.json <-> models.llava.LlavaConfig (or models.llava_next.LlavaNextConfig, by model_type), and the tokenizer/processor files that travel with a checkpoint."""
import dataclasses
import json
import numbers
import shutil
from pathlib import Path

from svdprune_jax.models.llava import LlavaConfig
from svdprune_jax.models.llava_next import LlavaNextConfig, config_from_hf

CONFIG = "config.json"
# Files the tokenizer and image processor load (transformers' AutoTokenizer / AutoProcessor), plus generation
# defaults; copied verbatim between an HF directory and ours.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
ASSETS = TOKENIZER_FILES + PROCESSOR_FILES + ("generation_config.json",)


def read_config_json(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys, got a JSON {type(config).__name__}")
    for key in ("vision_config", "text_config"):
        if not isinstance(config.get(key, {}), dict):
            raise ValueError(f"{path}: {key} must be a JSON object, got {config[key]!r:.60}")
    return config


def read_config(directory: str | Path) -> LlavaConfig:
    return config_from_hf(read_config_json(directory))


def config_to_hf(cfg: LlavaConfig, dtype: str, base: dict | None = None) -> dict:
    """A transformers-loadable LLaVA config.json dict for `cfg` with weights in `dtype`. Keys of `base` (the
    source config.json) that our config does not model (token ids, image_seq_length, ...) are kept."""
    base = base or {}
    fields = lambda c: {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    vision = {**base.get("vision_config", {}), **fields(cfg.vision), "model_type": "clip_vision_model"}
    text = {k: v for k, v in base.get("text_config", {}).items() if k not in ("rope_theta", "rope_scaling")}
    text.update(fields(cfg.text))
    if cfg.text.model_type == "llama":  # transformers' LlamaConfig has no window
        text.pop("sliding_window")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    layer = cfg.vision_feature_layer
    out = {k: v for k, v in base.items() if k not in ("torch_dtype", "image_token_id")}
    if isinstance(cfg, LlavaNextConfig):
        out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    out.update(architectures=[ARCHITECTURES[cfg.MODEL_TYPE]], model_type=cfg.MODEL_TYPE, dtype=dtype, vision_config=vision,
               text_config=text, image_token_index=cfg.image_token_id,
               vision_feature_layer=layer if isinstance(layer, numbers.Integral) else list(layer),
               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
               projector_hidden_act=cfg.projector_hidden_act, multimodal_projector_bias=cfg.multimodal_projector_bias,
               tie_word_embeddings=cfg.text.tie_word_embeddings)
    return out


def write_config(directory: str | Path, cfg: LlavaConfig, dtype: str, base: dict | None = None):
    (Path(directory) / CONFIG).write_text(json.dumps(config_to_hf(cfg, dtype, base), indent=2) + "\n")


def copy_assets(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer/processor/generation files present in `src`; returns their names."""
    names = [n for n in ASSETS if (Path(src) / n).is_file()]
    for n in names:
        shutil.copy2(Path(src) / n, Path(dst) / n)
    return names


def _find(directory: str | Path, names: tuple[str, ...], what: str) -> Path:
    d = Path(directory)
    if not any((d / n).is_file() for n in names):
        raise ValueError(f"{d}: no {what} files (looked for {', '.join(names)})")
    return d


def tokenizer_path(path: str | Path) -> Path:
    """The directory to hand `AutoTokenizer.from_pretrained` for a model path (HF directory or ours)."""
    return _find(path, TOKENIZER_FILES, "tokenizer")


def processor_path(path: str | Path) -> Path:
    """The directory to hand `CLIPImageProcessor` / `AutoProcessor.from_pretrained` for a model path."""
    return _find(path, PROCESSOR_FILES, "image processor")
