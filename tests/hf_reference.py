"""Our Llava from a tiny transformers LLaVA: config via `LlavaConfig.from_hf`, weights by walking the HF
state_dict (a test-only walk; the real key table is convert/'s). Plus HF-side helpers the parity tests share."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from svdprune_jax.models.llava import LlavaConfig
from svdprune_jax.models.llava_next import config_from_hf, model_class
from tiny_hf import tiny_llava


def _leaf(path: list[str], w: np.ndarray):
    """HF tensor -> (our path, our array): Linear weights transposed to (in, out), conv OIHW -> HWIO."""
    *mod, name = path
    if name == "weight":
        if mod[-1] == "patch_embedding":
            return mod + ["kernel"], w.transpose(2, 3, 1, 0)
        if mod[-1] in ("embed_tokens", "position_embedding"):
            return mod + ["embedding"], w
        if "norm" in mod[-1] or "layrnorm" in mod[-1]:
            return mod + ["scale"], w
        return mod + ["kernel"], w.T
    return path, w


def hf_params(hf, cfg: LlavaConfig, depth: int, to_numpy=lambda t: t.detach().numpy()) -> dict:
    """Nested pure dict in our parameter tree, layers stacked; vision layers past `depth` dropped. Each HF
    tensor becomes an array by `to_numpy` (e.g. a cast to bfloat16 bits) before it is permuted."""
    flat, stacks = {}, {}
    for key, t in hf.state_dict().items():
        key = key.removeprefix("model.").replace("vision_model.", "").replace("encoder.", "")
        if "post_layernorm" in key or (cfg.text.tie_word_embeddings and key == "lm_head.weight"):
            continue
        m = re.match(r"(.*?)\.layers\.(\d+)\.(.*)", key)
        if m:
            tower, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if tower == "vision_tower" and i >= depth:
                continue
            path, w = _leaf(rest.split("."), to_numpy(t))
            stacks.setdefault((tower, tuple(path)), {})[i] = w
        else:
            path, w = _leaf(key.split("."), to_numpy(t))
            flat[tuple(path)] = w
    for (tower, path), ws in stacks.items():
        flat[(tower, "layers") + path] = np.stack([ws[i] for i in range(len(ws))])
    tree = {}
    for path, w in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = w
    return tree


def tiny(seed=0, scale=4.0, **overrides):
    """`tiny_llava` with every matrix (and conv/embedding table) scaled up: at the default 0.02 init the
    attention is nearly uniform, so a wrong mask, position or RoPE layout would move logits by < 1e-4."""
    hf = tiny_llava(seed, **overrides)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.mul_(scale)
    return hf


def from_hf(hf, dtype=jnp.float32):
    """(model, graphdef, state) of our Llava holding the HF model's weights; the trees must match exactly."""
    cfg = config_from_hf(hf.config.to_dict())
    model = nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    depth = model.vision_tower.num_layers
    params = hf_params(hf, cfg, depth)
    state = nnx.state(model, nnx.Param)
    ours = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(state))
    theirs = jax.tree.map(lambda a: (a.shape, dtype), params)
    assert ours == theirs, "parameter tree differs from the HF walk"
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
    nnx.update(model, state)
    return model, *nnx.split(model)


def prompts(image_token_id: int, lengths: tuple[int, ...], n_image: int, seed: int = 0, image_at: int = 2):
    """Left-padded random prompts: BOS, text, `n_image` image tokens at `image_at`, text. (ids, mask) int64."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        text = rng.integers(3, image_token_id, size=n - n_image)
        row = np.concatenate([[1], text[1:image_at], np.full(n_image, image_token_id), text[image_at:]])
        ids[b, T - n:], mask[b, T - n:] = row, 1
    return ids, mask


def hf_fastv(hf, x, valid, pos, image_cols, K, keep, query=-1):
    """FastV by hand on transformers' layers: eager attention of layer K-1's `query` column (the last prompt
    token; head mean) ranks the image columns; layers K.. run on the kept columns with their original
    positions. Columns after `query` (decoded tokens) are causal, so they do not change the choice."""
    lm = hf.model.language_model
    hf.set_attn_implementation("eager")
    x, pos, valid = (torch.as_tensor(np.array(a)) for a in (x, pos, valid))

    def mask4d(valid):
        T = valid.shape[1]
        ok = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & valid[:, None, :]
        return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[:, None]

    emb = lm.rotary_emb(x, pos)
    m = mask4d(valid)
    for layer in lm.layers[:K - 1]:
        x = layer(x, attention_mask=m, position_embeddings=emb)
    last = lm.layers[K - 1]
    _, w = last.self_attn(last.input_layernorm(x), attention_mask=m, position_embeddings=emb)
    x = last(x, attention_mask=m, position_embeddings=emb)
    score = w[:, :, query].mean(1)  # (B, T)
    B, T = valid.shape
    kept = []
    for b in range(B):
        img = torch.as_tensor(image_cols[b])
        top = img[torch.topk(score[b, img], keep).indices]
        text = torch.as_tensor([c for c in range(T) if c not in set(image_cols[b].tolist())])
        kept.append(torch.sort(torch.cat([text, top])).values)
    kept = torch.stack(kept)
    take = lambda a: torch.gather(a, 1, kept.reshape(kept.shape + (1,) * (a.ndim - 2)).expand(*kept.shape, *a.shape[2:]))
    x, pos, valid = take(x), take(pos), take(valid)
    emb, m = lm.rotary_emb(x, pos), mask4d(valid)
    for layer in lm.layers[K:]:
        x = layer(x, attention_mask=m, position_embeddings=emb)
    hf.set_attn_implementation("sdpa")
    return lm.norm(x).detach().numpy(), kept.numpy()


def hf_positions(mask: np.ndarray) -> torch.Tensor:
    """transformers generate's position ids for left padding."""
    m = torch.as_tensor(mask)
    return (m.cumsum(-1) - 1).clamp(min=0)


def pixels(cfg: LlavaConfig, batch: int, seed: int = 0) -> np.ndarray:
    v = cfg.vision
    return np.random.default_rng(seed).standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
