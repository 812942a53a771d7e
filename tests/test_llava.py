"""LLaVA against transformers' LlavaForConditionalGeneration (float32): logits per config variant on a
left-padded batch, image features and projector, pruned forward via inputs_embeds, bf16, configs, bad input."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlavaConfig as HFLlavaConfig

import svdprune_jax
from hf_reference import from_hf, hf_positions, pixels, prompts, tiny
from svdprune_jax.models.llava import LLAVA_15_7B, LLAVA_15_13B, Llava, LlavaConfig, Pruning, adaptive_keep, forward
from test_adaptive import ref_adaptive
from test_leverage import ref_leverage

# tiny_hf's defaults: GQA (4 heads, 2 kv), layer -2, "default", theta 1e4, RMSNorm eps 1e-5, untied, SiLU decoder,
# quick-GELU tower (LayerNorm eps 1e-5), GELU projector with biases, no attention/MLP biases. Each other variant
# moves several of these (every compile costs seconds on CI's CPU), so every config value our models read
# differs from its default in at least one variant.
VARIANTS = {
    "gqa": {},
    "mha+tied+biases+eps": dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                rms_norm_eps=0.05),
    "layer-1+full+activations": dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     hidden_act="gelu_pytorch_tanh", vision_hidden_act="gelu",
                                     projector_hidden_act="quick_gelu", multimodal_projector_bias=False,
                                     vision_layer_norm_eps=0.01),
    "layers-3,-1+theta5e5+mqa+head_dim": dict(vision_feature_layer=[-3, -1], rope_theta=500000.0,
                                              num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-3),
}


@pytest.fixture(scope="module")
def base():
    hf = tiny()
    return hf, *from_hf(hf)


def _batch(cfg, n_image, lengths=None, seed=0):
    lengths = lengths or (n_image + 11, n_image + 5)  # different lengths: row 1 left-padded
    ids, mask = prompts(cfg.image_token_id, lengths, n_image, seed)
    return pixels(cfg, len(lengths), seed), ids, mask


def _hf_logits(hf, px, ids, mask, inputs_embeds=None):
    kw = dict(inputs_embeds=inputs_embeds) if inputs_embeds is not None else dict(
        input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px))
    with torch.no_grad():
        return hf(**kw, attention_mask=torch.as_tensor(mask), position_ids=hf_positions(mask)).logits.numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, base):
    hf = base[0] if variant == "gqa" else tiny(**VARIANTS[variant])
    model, graphdef, state = base[1:] if variant == "gqa" else from_hf(hf)
    cfg = model.config
    px, ids, mask = _batch(cfg, cfg.num_image_tokens)
    logits, kept, columns = forward(graphdef, state, px, ids, mask)
    assert kept is None and columns is None and logits.shape == ids.shape + (cfg.text.vocab_size,)
    want = _hf_logits(hf, px, ids, mask)
    ok = mask.astype(bool)  # padding rows are masked everywhere: no reference value
    err = np.abs(np.asarray(logits)[ok] - want[ok]).max()
    print(f"{variant}: max abs err {err:.2e} (max |logit| {np.abs(want[ok]).max():.2f})")
    assert err <= 1e-5  # float32 rounding leaves a few 1e-6 on these O(1) logits


def test_image_features_and_projector_match_transformers(base):
    hf, model, _, _ = base
    px = pixels(model.config, 2)
    with torch.no_grad():
        want = torch.stack(hf.model.get_image_features(torch.as_tensor(px)).pooler_output).numpy()
        x = torch.randn(2, 5, model.config.vision.hidden_size)
        want_proj = hf.model.multi_modal_projector(x).numpy()
    feats, _ = model.image_features(jnp.asarray(px))
    np.testing.assert_allclose(model.multi_modal_projector(feats), want, atol=1e-5)
    np.testing.assert_allclose(model.multi_modal_projector(jnp.asarray(x.numpy())), want_proj, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "cls_attention"])  # plain scores, and the CLS-attention path
def test_pruned_forward_matches_transformers_inputs_embeds(method, base):
    """Our pruned forward == HF fed the same kept vision features (projected by HF) through inputs_embeds."""
    hf, model, graphdef, state = base
    cfg, k = model.config, 5
    px, ids, mask = _batch(cfg, k)
    pruning = Pruning(method, k)
    logits, kept, _ = forward(graphdef, state, px, ids, mask, pruning=pruning, key=jax.random.key(3))
    kept = np.asarray(kept)
    assert kept.shape == (2, k) and (np.diff(kept, axis=1) > 0).all() and kept.max() < cfg.num_image_tokens
    with torch.no_grad():
        feats = hf.model.vision_tower(torch.as_tensor(px), output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = torch.gather(feats, 1, torch.tensor(kept, dtype=torch.long)[..., None].expand(-1, -1, feats.shape[-1]))
        embeds = hf.model.language_model.embed_tokens(torch.as_tensor(ids))
        is_img = torch.as_tensor(ids == cfg.image_token_id)
        embeds[is_img] = hf.model.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
    want = _hf_logits(hf, None, ids, mask, inputs_embeds=embeds)
    ok = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[ok], want[ok], rtol=0, atol=1e-5)


def test_projector_matrix_scores_the_projector_outputs(base):
    """matrix="projector": kept tokens = top-k float64 leverage of HF's projector outputs (float64 model), and
    the embeddings are those outputs' kept rows. The adaptive budget on the same matrix matches too."""
    hf, model, graphdef, state = base
    px, k, rank = pixels(model.config, 3, seed=5), 5, 3
    with torch.no_grad():
        hf64 = copy.deepcopy(hf).double()
        feats = hf64.model.vision_tower(torch.as_tensor(px, dtype=torch.float64),
                                        output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = hf64.model.multi_modal_projector(feats).numpy()
    lev = np.stack([ref_leverage(p, rank) for p in proj])
    order = np.argsort(-lev, axis=1)
    gap = np.take_along_axis(lev, order[:, k - 1:k], 1) - np.take_along_axis(lev, order[:, k:k + 1], 1)
    assert gap.min() > 1e-4  # no near-tie at the cut: float32 must find the same set
    embeds, kept = model.encode_images(jnp.asarray(px), Pruning("svd", k, (("center", False), ("rank", rank)), "projector"))
    np.testing.assert_array_equal(kept, np.sort(order[:, :k], axis=1))
    np.testing.assert_allclose(embeds, np.take_along_axis(proj, np.asarray(kept)[..., None], 1), atol=1e-5)
    _, kept_tower = model.encode_images(jnp.asarray(px), Pruning("svd", k, (("center", False), ("rank", rank))))
    assert not np.array_equal(kept, kept_tower)  # the choice of matrix matters on these features
    buckets = (2, 4, 8, 16)
    got = adaptive_keep(graphdef, state, px, 0.6, buckets, matrix="projector", rule=(("energy", 0.9), ("center", True)))
    want = [ref_adaptive(p, 0.6, buckets, energy=0.9, center=True) for p in proj]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="pruning matrix 'decoder' is not one of"):
        Pruning("svd", k, (), "decoder")


def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(base):
    """bf16 weights/activations (float32 softmax, norms, RoPE) against our float32 logits.

    The yardstick is transformers' own bf16 model on the same inputs: bf16 keeps 8 significant bits, so
    both round every matmul output and the residual stream, and logits of magnitude ~2 move by a few 1e-2
    (measured: max 0.03-0.06, RMS ~0.006 for both). Ours must be within 1.5x of its RMS and 2x of its max
    error; a bf16 softmax, bf16 RoPE angles or a lost cast shows up as a multiple of that.
    """
    hf, _, g32, s32 = base
    _, g16, s16 = from_hf(hf, jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(s16)} == {jnp.dtype(jnp.bfloat16)}
    cfg = nnx.merge(g32, s32).config
    px, ids, mask = _batch(cfg, cfg.num_image_tokens)
    ok = mask.astype(bool)
    ref = np.asarray(forward(g32, s32, px, ids, mask)[0])[ok]
    got = np.asarray(forward(g16, s16, px, ids, mask)[0])[ok]
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        theirs = hf16(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px).bfloat16(),
                      attention_mask=torch.as_tensor(mask), position_ids=hf_positions(mask)).logits.float().numpy()[ok]
    want = _hf_logits(hf, px, ids, mask)[ok]
    rms = lambda e: np.sqrt((e ** 2).mean())
    ours_err, hf_err = got - ref, theirs - want
    print(f"bf16: ours max {np.abs(ours_err).max():.3f} rms {rms(ours_err):.4f}; "
          f"transformers max {np.abs(hf_err).max():.3f} rms {rms(hf_err):.4f}; max |logit| {np.abs(ref).max():.2f}")
    assert rms(ours_err) <= 1.5 * rms(hf_err) and np.abs(ours_err).max() <= 2 * np.abs(hf_err).max()


def test_bad_input(base):
    _, model, graphdef, state = base
    cfg = model.config
    N = cfg.num_image_tokens
    px, ids, mask = _batch(cfg, N)
    with pytest.raises(ValueError, match="pixel_values shape"):
        forward(graphdef, state, np.zeros((2, 3, 32, 32), np.float32), ids, mask)
    px_, ids_, mask_ = _batch(cfg, N - 1)
    with pytest.raises(ValueError, match=rf"image tokens per prompt \[{N - 1}, {N - 1}\] differ from the image budget {N}"):
        forward(graphdef, state, px_, ids_, mask_)
    with pytest.raises(ValueError, match="image budget 4"):
        forward(graphdef, state, px, ids, mask, pruning=Pruning("svd", 4))
    with pytest.raises(ValueError, match="left padding"):
        forward(graphdef, state, px, ids, mask[:, ::-1])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        forward(graphdef, state, px_, ids_, mask_, pruning=Pruning("nope", N - 1))


# llava-hf/llava-1.5-7b-hf's config.json: the text_config leaves most keys at transformers' defaults.
HUB_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_configs_from_hub_and_transformers():
    assert LlavaConfig.from_hf(HUB_7B) == LLAVA_15_7B
    big = dict(HUB_7B, text_config=dict(HUB_7B["text_config"], hidden_size=5120, intermediate_size=13824,
                                        num_attention_heads=40, num_hidden_layers=40))
    assert LlavaConfig.from_hf(big) == LLAVA_15_13B
    # through transformers 5 (rope_parameters layout, every key written out)
    assert LlavaConfig.from_hf(HFLlavaConfig(**HUB_7B).to_dict()) == LLAVA_15_7B
    assert LLAVA_15_7B.num_image_tokens == 576
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'mean'"):
        LlavaConfig.from_hf(dict(HUB_7B, vision_feature_select_strategy="mean"))


def test_7b_parameter_tree_shapes():
    model = nnx.eval_shape(lambda: Llava(LLAVA_15_7B, rngs=nnx.Rngs(0)))
    tree = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert tree["vision_tower"]["layers"]["mlp"]["fc1"]["kernel"] == (23, 1024, 4096)  # layer -2: 23 of 24
    assert tree["vision_tower"]["embeddings"]["patch_embedding"]["kernel"] == (14, 14, 3, 1024)
    assert tree["multi_modal_projector"]["linear_1"] == {"kernel": (1024, 4096), "bias": (4096,)}
    lm = tree["language_model"]
    assert lm["layers"]["self_attn"]["k_proj"] == {"kernel": (32, 4096, 4096)}
    assert lm["layers"]["mlp"]["down_proj"] == {"kernel": (32, 11008, 4096)}
    assert lm["layers"]["input_layernorm"] == {"scale": (32, 4096)} and lm["norm"] == {"scale": (4096,)}
    assert lm["embed_tokens"] == {"embedding": (32064, 4096)} and tree["lm_head"] == {"kernel": (4096, 32064)}
    assert set(tree) == {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}
