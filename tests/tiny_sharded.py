"""A tiny random LLaVA whose every tensor-parallel size divides by 8 (8 vision heads, 16 query and 8 key/value
heads: GQA), and a batch of 8 left-padded prompts: the model of the sharded and multi-process checks."""
import numpy as np
from flax import nnx

from svdprune_jax.models.clip import CLIPVisionConfig
from svdprune_jax.models.llama import LlamaConfig
from svdprune_jax.models.llava import Llava, LlavaConfig
from svdprune_jax.models.llava_next import model_class

B = 8  # prompts, one image each
CONFIG = LlavaConfig(
    vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8,
                            image_size=28, patch_size=7),
    text=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=4, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False),
    image_token_id=127)
PIXELS = np.random.default_rng(0).standard_normal((B, 3, 28, 28)).astype(np.float32)


def random_model(config: LlavaConfig = CONFIG) -> Llava:
    """Matrices N(0, 1/fan_in) as at init, norm scales 1 and biases 0 perturbed by N(0, 0.1^2), drawn with NumPy
    (eager `Llava(...)` init takes ~30 s on a loaded 2-core machine). Init scale on purpose: with matrices x4,
    float32 rounding is amplified so much that one device alone moves logits by 4e-4 between a batch of 8 and a
    batch of 1 (2e-6 at init scale), too much for the 1e-5 the sharded checks hold to. `config` may be a
    LlavaNextConfig (its image_newline drawn like a bias)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_class(config)(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(state):
        a = rng.standard_normal(var.shape).astype(np.float32)
        var.set_value(a / np.sqrt(var.shape[-2]) if var.ndim >= 2 else (path[-1] == "scale") + 0.1 * a)
    return nnx.merge(graphdef, state)


def prompts(n_image: int) -> tuple[np.ndarray, np.ndarray]:
    """B left-padded prompts, each shorter than the one before (so the first b of them are as wide as all B):
    BOS, text, n_image image tokens, text."""
    rng = np.random.default_rng(1)
    lengths = [n_image + 4 + 2 * (B - 1 - b) for b in range(B)]
    ids, mask = np.zeros((B, max(lengths)), np.int32), np.zeros((B, max(lengths)), np.int32)
    for b, n in enumerate(lengths):
        text = rng.integers(3, CONFIG.image_token_id, n - n_image)
        ids[b, -n:] = np.concatenate([[1], text[:2], np.full(n_image, CONFIG.image_token_id), text[3:]])
        mask[b, -n:] = 1
    return ids, mask
