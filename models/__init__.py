"""Flax NNX LLaVA-1.5: CLIP vision tower, LLaMA decoder with KV cache and FastV, pruning hook, generation."""
from svdprune_jax.models.clip import CLIP_VIT_L_14_336, CLIPVisionConfig, CLIPVisionTower
from svdprune_jax.models.cache import KVCache
from svdprune_jax.models.generate import Decoding, Generation, generate
from svdprune_jax.models.llama import FastV, Llama, LlamaConfig
from svdprune_jax.models.llava import LLAVA_15_13B, LLAVA_15_7B, Llava, LlavaConfig, Pruning, forward
from svdprune_jax.models.sampling import Sampling

__all__ = [
    "CLIP_VIT_L_14_336", "CLIPVisionConfig", "CLIPVisionTower", "Decoding", "FastV", "Generation", "KVCache",
    "LLAVA_15_13B", "LLAVA_15_7B", "Llama", "LlamaConfig", "Llava", "LlavaConfig", "Pruning", "Sampling", "forward",
    "generate",
]
