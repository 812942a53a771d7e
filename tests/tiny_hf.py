"""Tiny random transformers LLaVA checkpoints: the PyTorch reference for parity tests.

Every variant is small enough to build in well under a second, so tests can make many of them.
"""
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

IMAGE_TOKEN_ID = 127


def tiny_llava_config(
    *,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    num_key_value_heads=2,
    head_dim=None,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    vision_hidden_act="quick_gelu",
    vision_layer_norm_eps=1e-5,
    projector_hidden_act="gelu",
    multimodal_projector_bias=True,
    image_size=28,
    patch_size=7,
    vision_layers=3,
    text_layers=2,
    text_model_type="llama",
    sliding_window=None,
):
    """Every config value our models read is an argument (defaults: llava-1.5's, except the sizes). A "mistral"
    text model carries `sliding_window` and no attention/MLP biases (MistralConfig has neither)."""
    text = dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=rms_norm_eps,
        hidden_act=hidden_act,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if text_model_type == "mistral":
        del text["attention_bias"], text["mlp_bias"]
        text.update(model_type="mistral", sliding_window=sliding_window)
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
        hidden_act=vision_hidden_act,
        layer_norm_eps=vision_layer_norm_eps,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
        multimodal_projector_bias=multimodal_projector_bias,
        tie_word_embeddings=tie_word_embeddings,
    )


# (height, width) in tiles of the tower's 32 pixels: wide, tall, square and long grids (3, 4 and 5 views)
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def tiny_llava_next_config(image_grid_pinpoints=TINY_PINPOINTS, **overrides):
    """`tiny_llava_config`'s towers and decoder as a LLaVA-NeXT (32-pixel tiles of 4 x 4 patches)."""
    base = tiny_llava_config(**{"image_size": 32, "patch_size": 8, **overrides}).to_dict()
    keep = ("vision_config", "text_config", "image_token_index", "vision_feature_layer", "projector_hidden_act",
            "vision_feature_select_strategy", "multimodal_projector_bias", "tie_word_embeddings")
    return LlavaNextConfig(**{k: base[k] for k in keep}, image_grid_pinpoints=image_grid_pinpoints)


def tiny_llava(seed=0, next=False, **overrides) -> LlavaForConditionalGeneration:
    """A float32 eval-mode model with random weights (seeded), built from `tiny_llava_config` (`next`: a
    LlavaNextForConditionalGeneration from `tiny_llava_next_config`)."""
    torch.manual_seed(seed)
    model = (LlavaNextForConditionalGeneration(tiny_llava_next_config(**overrides)) if next
             else LlavaForConditionalGeneration(tiny_llava_config(**overrides))).eval()
    # Random init leaves norms at 1/0 and biases at 0; perturb them so a wrongly wired norm or bias cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model
