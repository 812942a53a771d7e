"""The per-layer inference layout (`models.stack.per_layer`) computes exactly what the stacked one does."""
import jax
import numpy as np
import pytest
from flax import nnx

from hf_reference import from_hf, pixels, prompts, tiny
from svdprune_jax.models.generate import Decoding, generate
from svdprune_jax.models.llama import FastV
from svdprune_jax.models.llava import Pruning, forward
from svdprune_jax.models.stack import per_layer

M = 6


@pytest.fixture(scope="module")
def models():
    hf = tiny(vision_feature_layer=[-3, -1])  # two feature layers: two loop segments in the tower
    model, graphdef, state = from_hf(hf)
    stacked_params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    per = per_layer(from_hf(hf)[0])
    return model.config, (graphdef, state), nnx.split(per), stacked_params


def test_layout_and_params(models):
    cfg, _, (graphdef, state), stacked_params = models
    params = nnx.to_pure_dict(state)
    for tower in ("vision_tower", "language_model"):
        layers = params[tower]["layers"]
        assert sorted(layers) == list(range(len(layers)))
        for i, layer in layers.items():
            jax.tree.map(lambda a, s: np.testing.assert_array_equal(a, s[i]), layer, stacked_params[tower]["layers"])


@pytest.mark.parametrize("kw", [dict(), dict(pruning=Pruning("cls_attention", 5)), dict(fastv=FastV(4, 1))],
                         ids=["unpruned", "cls_attention", "fastv"])
def test_forward_and_generate_equal_stacked(models, kw):
    cfg, stacked, per, _ = models
    n = kw["pruning"].k if "pruning" in kw else cfg.num_image_tokens
    ids, mask = prompts(cfg.image_token_id, (n + 9, n + 4), n)
    px = pixels(cfg, 2)
    want, got = (forward(*m, px, ids, mask, **kw) for m in (stacked, per))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    want, got = (generate(*m, px, ids, mask, decoding=Decoding(M), **kw).tokens for m in (stacked, per))
    np.testing.assert_array_equal(got, want)
