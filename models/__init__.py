"""Flax NNX LLaVA-1.5: CLIP vision tower, LLaMA decoder with KV cache and FastV, pruning hook, generation."""
from svdprune_jax.models.clip import CLIP_VIT_L_14_336, CLIPVisionConfig, CLIPVisionTower
from svdprune_jax.models.generate import Generation, generate
from svdprune_jax.models.llama import FastV, Llama, LlamaConfig, init_cache
from svdprune_jax.models.llava import LLAVA_15_13B, LLAVA_15_7B, Llava, LlavaConfig, Pruning, forward

__all__ = [
    "CLIP_VIT_L_14_336", "CLIPVisionConfig", "CLIPVisionTower", "FastV", "Generation", "LLAVA_15_13B", "LLAVA_15_7B",
    "Llama", "LlamaConfig", "Llava", "LlavaConfig", "Pruning", "forward", "generate", "init_cache",
]
