"""CLIP vision tower vs transformers' PyTorch CLIPVisionModel (tiny random models, eager attention)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from svdprune_jax.models.clip import CLIP_VIT_L_14_336, CLIPVisionConfig, CLIPVisionTower, feature_layers

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=7)


def hf_clip(seed=0, **overrides) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = transformers.CLIPVisionModel(cfg).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():  # random init leaves norms at 1/0, which would hide a miswired norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_to_params(sd: dict, num_layers: int) -> dict:
    """Minimal test-local HF state_dict -> our pure param dict (stack layers, transpose kernels)."""
    sd = {k.removeprefix("vision_model."): v.float().numpy() for k, v in sd.items()}
    lin = lambda p: {"kernel": sd[f"{p}.weight"].T, "bias": sd[f"{p}.bias"]}
    ln = lambda p: {"scale": sd[f"{p}.weight"], "bias": sd[f"{p}.bias"]}
    layers = [{"layer_norm1": ln(f"{p}.layer_norm1"), "layer_norm2": ln(f"{p}.layer_norm2"),
               "self_attn": {n: lin(f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
               "mlp": {"fc1": lin(f"{p}.mlp.fc1"), "fc2": lin(f"{p}.mlp.fc2")}}
              for p in (f"encoder.layers.{i}" for i in range(num_layers))]
    return {
        "embeddings": {"patch_embedding": {"kernel": sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)},
                       "class_embedding": sd["embeddings.class_embedding"],
                       "position_embedding": {"embedding": sd["embeddings.position_embedding.weight"]}},
        "pre_layrnorm": ln("pre_layrnorm"),
        "layers": jax.tree.map(lambda *a: np.stack(a), *layers),
    }


def ours_from_hf(hf, num_layers, poison_from=None, **kw) -> CLIPVisionTower:
    """Our tower holding HF's weights; layers from `poison_from` on are NaN."""
    cfg = CLIPVisionConfig.from_hf(hf.config.to_dict())
    tower = nnx.eval_shape(lambda: CLIPVisionTower(cfg, num_layers, rngs=nnx.Rngs(0), **kw))  # no random init
    state = nnx.state(tower, nnx.Param)
    pure = hf_to_params(hf.state_dict(), num_layers)
    if poison_from is not None:
        pure["layers"] = jax.tree.map(lambda a: np.concatenate([a[:poison_from], np.full_like(a[poison_from:], np.nan)]),
                                      pure["layers"])
    # the contract: our param tree is exactly the mapped HF tree (names and shapes)
    assert jax.tree.map(np.shape, nnx.to_pure_dict(state)) == jax.tree.map(np.shape, pure)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a, v: jnp.asarray(a, v.dtype), pure, nnx.to_pure_dict(state)))
    nnx.update(tower, state)
    return tower


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(graphdef, state, x, layer, return_attention):
    return nnx.merge(graphdef, state)(x, layer, return_attention=return_attention)


def forward(tower, x, layer, return_attention=False):
    """Jitted the way models/llava.py uses the tower: split state in, static graph and layer selection."""
    graphdef, state = nnx.split(tower)
    return _forward(graphdef, state, x, layer, return_attention)


def pixels(cfg, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, cfg["num_channels"], cfg["image_size"], cfg["image_size"])).astype(np.float32)


def hf_run(hf, x):
    with torch.no_grad():
        out = hf(torch.from_numpy(x).to(hf.dtype), output_hidden_states=True, output_attentions=True)
    return [h.float().numpy() for h in out.hidden_states], [a.float().numpy() for a in out.attentions]


@pytest.mark.parametrize("layer,act", [(-2, "quick_gelu"), (-1, "gelu"), ((-2, -1), "gelu_new")])
def test_features_and_attention_match_hf(layer, act):
    hf = hf_clip(hidden_act=act)
    x = pixels(hf.config.to_dict())
    hs, attns = hf_run(hf, x)
    depth, idx = feature_layers(layer, TINY["num_hidden_layers"])
    feats, probs = forward(ours_from_hf(hf, depth), x, layer, return_attention=True)
    want = np.concatenate([hs[i] for i in idx], axis=-1)
    assert feats.shape == want.shape == (2, 17, 32 * len(idx))
    err_f, err_a = np.abs(np.asarray(feats) - want).max(), np.abs(np.asarray(probs) - attns[depth - 1]).max()
    print(f"layer={layer} act={act}: features max err {err_f:.2e}, attention max err {err_a:.2e}")
    assert err_f <= 1e-5 and err_a <= 1e-5


def test_layers_past_selected_are_not_computed():
    """With layers 3 and 4 poisoned (NaN), features up to hidden_states[2] still match HF: never computed."""
    hf = hf_clip()
    x = pixels(hf.config.to_dict())
    hs, _ = hf_run(hf, x)
    tower = ours_from_hf(hf, 4, poison_from=2)
    # unsorted, non-adjacent tuple including the embeddings (hidden_states[0])
    assert np.abs(np.asarray(forward(tower, x, (-3, -5))) - np.concatenate([hs[2], hs[0]], -1)).max() <= 1e-5
    assert np.isnan(forward(tower, x, -1)).all()  # the poison is live


def test_bf16_as_accurate_as_transformers_bf16():
    """bf16 (8-bit mantissa, unit roundoff 2^-9) params and activations: judge our error against fp32 by
    transformers' own bf16 error on the same weights and input, so the bound is the format's, not a guess."""
    hf = hf_clip()
    x = pixels(hf.config.to_dict(), batch=4)
    ours = ours_from_hf(hf, 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    hs, attns = hf_run(hf, x)
    hs16, attns16 = hf_run(hf.to(torch.bfloat16), x)
    feats, probs = forward(ours, x, -2, return_attention=True)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert feats.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
    rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b)
    ours_f, hf_f, ours_a, hf_a = rel(feats, hs[3]), rel(hs16[3], hs[3]), rel(probs, attns[2]), rel(attns16[2], attns[2])
    print(f"bf16 relative error vs fp32: features ours {ours_f:.2e} / HF {hf_f:.2e}; attention ours {ours_a:.2e} / HF {hf_a:.2e}")
    assert ours_f <= 1.5 * hf_f + 2**-9 and ours_a <= 1.5 * hf_a + 2**-9
    assert ours_f <= 2e-2  # a few roundings of 2^-9 per layer, 3 layers


def test_bad_input_raises():
    tower = nnx.eval_shape(lambda: CLIPVisionTower(CLIPVisionConfig(**TINY), 3, rngs=nnx.Rngs(0)))  # checks precede compute
    for shape in [(1, 3, 28, 21), (1, 3, 21, 21), (1, 1, 28, 28), (3, 28, 28)]:
        with pytest.raises(ValueError, match="pixel_values shape"):
            tower(jnp.zeros(shape), -2)
    with pytest.raises(ValueError, match="dtype"):
        tower(jnp.zeros((1, 3, 28, 28), jnp.int32), -2)
    with pytest.raises(ValueError, match="needs 4 layers"):
        tower(jnp.zeros((1, 3, 28, 28)), -1)
    with pytest.raises(ValueError, match="embeddings"):
        tower(jnp.zeros((1, 3, 28, 28)), -5, return_attention=True)
    for bad in (5, -6, (), (-1, 7), 1.5):
        with pytest.raises(ValueError, match="vision_feature_layer"):
            feature_layers(bad, 4)
    with pytest.raises(ValueError, match="num_layers"):
        CLIPVisionTower(CLIPVisionConfig(**TINY), 5, rngs=nnx.Rngs(0))


def test_feature_layers_and_config():
    assert feature_layers(-2, 24) == (23, (23,))
    assert feature_layers((-2, -1), 24) == (24, (23, 24))
    assert feature_layers([3, -25], 24) == (3, (3, 0))
    # defaults follow transformers (config.json files omit keys left at them)
    assert CLIPVisionConfig.from_hf({}) == CLIPVisionConfig.from_hf(transformers.CLIPVisionConfig().to_dict())
    llava_hf_json = dict(hidden_size=1024, image_size=336, intermediate_size=4096, model_type="clip_vision_model",
                         num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768, vocab_size=32000)
    assert CLIPVisionConfig.from_hf(llava_hf_json) == CLIP_VIT_L_14_336
    assert CLIP_VIT_L_14_336.num_patches == 576 and CLIP_VIT_L_14_336.head_dim == 64
    with pytest.raises(ValueError, match="activation"):
        CLIPVisionConfig.from_hf({"hidden_act": "gelu_10"})
    with pytest.raises(ValueError, match="model_type"):
        CLIPVisionConfig.from_hf({"model_type": "siglip_vision_model"})
    with pytest.raises(ValueError, match="image_size"):
        CLIPVisionConfig(**{**TINY, "image_size": 30})
