"""The bundled tiny LLaVA: its architecture (presets), scene geometry and where its files live.

Same shape as LLaVA-1.5: CLIP ViT tower (no conv stem) read at `vision_feature_layer` -2, a 2-layer GELU
projector, a LLaMA decoder, over the word-level vocabulary of `svdprune_jax.synthetic.vocab`. The tower's last layer is never
read by LLaVA; it exists so that the exported model is LLaVA-1.5-shaped (see `svdprune_jax.synthetic.train.export`).
"""
import functools
import json
from pathlib import Path

from svdprune_jax.synthetic.scene import SceneConfig
from svdprune_jax.synthetic.vocab import IMAGE_TOKEN, build_tokenizer
from svdprune_jax.models.clip import CLIPVisionConfig
from svdprune_jax.models.llama import LlamaConfig
from svdprune_jax.models.llava import LlavaConfig

ASSETS = Path(__file__).resolve().parent / "assets"  # package data
MODEL_DIR = ASSETS / "model"  # the exported HF directory
EXAMPLE_IMAGE = ASSETS / "example.png"  # `svdprune-jax run`'s default image; example.json holds its question


def example() -> dict:
    """The bundled example's question, answer and how it was chosen."""
    return json.loads((ASSETS / "example.json").read_text())

SCENES = {
    "bundled": SceneConfig(),  # 112 x 112 px, patch 8: 14 x 14 = 196 image tokens
    "tiny": SceneConfig(image_size=80, patch_size=8, object_sizes=(2.0,)),  # 10 x 10 = 100 tokens, for tests
}


@functools.cache
def vocab() -> dict[str, int]:
    return build_tokenizer().get_vocab()


def llava_config(scene: SceneConfig, width: int, vision_layers: int, text_width: int, text_layers: int,
                 head_dim: int = 32) -> LlavaConfig:
    """A LLaVA-1.5-shaped config over the benchmark vocabulary; tower MLP 4x wide, decoder SwiGLU 3x."""
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=vision_layers,
                              num_attention_heads=width // head_dim, image_size=scene.image_size,
                              patch_size=scene.patch_size)
    heads = text_width // head_dim
    text = LlamaConfig(vocab_size=len(vocab()), hidden_size=text_width, intermediate_size=3 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                       tie_word_embeddings=False)
    return LlavaConfig(vision=vision, text=text, image_token_id=vocab()[IMAGE_TOKEN], vision_feature_layer=-2)


PRESETS = {
    "bundled": llava_config(SCENES["bundled"], width=128, vision_layers=6, text_width=128, text_layers=4),
    "tiny": llava_config(SCENES["tiny"], width=32, vision_layers=3, text_width=32, text_layers=2, head_dim=16),
}
