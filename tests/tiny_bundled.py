"""A random-weight model of the bundled architecture at tiny size, saved with the bundled tokenizer and
processor files: a real model directory for end-to-end tests of the CLI and the evaluation harnesses."""
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from svdprune_jax.synthetic.bundled import PRESETS, SCENES
from svdprune_jax.synthetic.vocab import save_processor_files
from svdprune_jax.convert import save_model
from svdprune_jax.models.llava import Llava


def tiny_model_dir(out: Path, seed: int = 0) -> Path:
    model = Llava(PRESETS["tiny"], dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    save_model(model, out)
    save_processor_files(out, SCENES["tiny"])
    return out
