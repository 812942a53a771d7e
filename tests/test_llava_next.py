"""LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration (float32, tiny random configs, 32-pixel tiles,
five pinpoints): the any-resolution geometry and packed order, logits of batches mixing grids (LLaMA and Mistral
decoders), greedy generation, pruned forwards (one selection per image and per view) against transformers fed the
same kept features, the selections against float64 references on each image's (or view's) own tokens, every method
in both modes, FastV against transformers' layers driven by hand on each row alone, adaptive budgets against a
float64 reference, compile counts across aspect ratios, conversion both ways, the pipeline, `run` and `eval` by path,
bad input."""
import copy
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

import svdprune_jax.convert as convert
from hf_reference import from_hf, hf_fastv, hf_positions, tiny
from svdprune_jax.convert import keymap
from svdprune_jax.convert.safetensors_io import INDEX, read_checkpoint
from svdprune_jax.benchmarks.timing import Compiles
from svdprune_jax.cli import evaluate, main as cli
from svdprune_jax.inference.pictures import anyres_overlay
from svdprune_jax.inference.pipeline import CHAT_TEMPLATE, Pipeline
from svdprune_jax.models import anyres
from svdprune_jax.models.generate import Decoding, generate
from svdprune_jax.models.llama import FastV
from svdprune_jax.models.llava import GIVEN, Pruning, adaptive_keep, check_prompts, forward
from svdprune_jax.models.llava_next import LLAVA_NEXT_VICUNA_7B, LlavaNextConfig, config_from_hf, layout
from test_convert import no_leftovers, save, v5_state, write_hf
from test_evaluate import CHAT, RUN, write_gqa
from test_adaptive import ref_adaptive
from test_leverage import ref_leverage
from tiny_hf import TINY_PINPOINTS

# (height, width): wide (1 x 3 crops), tall (2 x 1), square (2 x 2), wide (1 x 2), tall (3 x 1)
SIZES = {"wide": (30, 85), "tall": (60, 29), "square": (50, 47), "wide2": (30, 58), "tall3": (100, 30)}
PAIRS = [("wide", "tall"), ("square", "tall3"), ("wide2", "square")]


def processor(pinpoints=TINY_PINPOINTS):
    return LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=pinpoints)


def pictures(names, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*SIZES[n], 3), dtype=np.uint8)) for n in names]


def processed(cfg, names, seed=0):
    out = processor()(images=pictures(names, seed), return_tensors="np")
    return out["pixel_values"], out["image_sizes"], layout(cfg, out["pixel_values"], out["image_sizes"])


def left_padded(image_token_id, counts, seed=0):
    """Prompts of text, `counts[b]` image tokens, text; different text lengths, left padding."""
    rng = np.random.default_rng(seed)
    rows = [[1, *rng.integers(3, 100, 2 + 3 * b), *[image_token_id] * int(n), *rng.integers(3, 100, 4)]
            for b, n in enumerate(counts)]
    T = max(map(len, rows))
    ids, mask = np.zeros((len(rows), T), np.int64), np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def base():
    hf = tiny(next=True)
    return hf, *from_hf(hf)


def hf_logits(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf(input_ids=None if "inputs_embeds" in kw else torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                  position_ids=hf_positions(mask), **kw).logits.numpy()


def hf_order(hf, sizes) -> list[np.ndarray]:
    """transformers' packed order of each image: its pack_image_features run on features that hold their own
    view-major index (view * N + patch), newline -1."""
    cfg = hf.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    views = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    feats = [torch.arange(v * n, dtype=torch.float64).reshape(v, n, 1) for v in views]
    packed, _ = hf.model.pack_image_features(feats, torch.as_tensor(np.asarray(sizes)), "default",
                                             image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return [p[:, 0].numpy().astype(int) for p in packed]


def hf_view_features(hf, px, layer=-2):
    """The tower's selected features of every view (B, V * N, Dv), CLS dropped."""
    B, V = px.shape[:2]
    with torch.no_grad():
        h = hf.model.vision_tower(torch.as_tensor(px).flatten(0, 1), output_hidden_states=True).hidden_states[layer]
    return h[:, 1:].reshape(B, -1, h.shape[-1]).numpy()


def test_geometry_and_packed_order_match_transformers(base):
    """Grid, token count and packed order of many sizes (and the 7B preset's pinpoints) against transformers."""
    hf = base[0]
    for pinpoints, tile, side in ((TINY_PINPOINTS, 32, 4), ([list(p) for p in LLAVA_NEXT_VICUNA_7B.image_grid_pinpoints], 336, 24)):
        rng = np.random.default_rng(1)
        sizes = [tuple(int(x) for x in rng.integers(8, 4 * tile, 2)) for _ in range(40)] + [(tile, tile), (1, 2 * tile)]
        for size in sizes:
            assert anyres.grid_shape(size, pinpoints, tile) == get_anyres_image_grid_shape(list(size), pinpoints, tile)
    sizes = [SIZES[n] for n in SIZES] + [(33, 33), (7, 200), (200, 7)]
    grids = set()
    for size, want in zip(sizes, hf_order(hf, sizes)):
        img = anyres.image_tokens(size, TINY_PINPOINTS, 32, 4)
        got = np.where(img.packed < 0, -1, img.tokens[np.maximum(img.packed, 0)])
        np.testing.assert_array_equal(got, want)
        grids.add(img.grid)
    assert len(grids) == 5  # every pinpoint's grid was exercised
    assert LLAVA_NEXT_VICUNA_7B.bounds == (5, 2880, 2928)


@pytest.mark.parametrize("pair", PAIRS)
def test_logits_match_transformers(pair, base):
    hf, model, graphdef, state = base
    px, sizes, images = processed(model.config, pair)
    grids = [anyres.grid_shape(tuple(s), TINY_PINPOINTS, 32) for s in sizes]
    assert grids[0] != grids[1]
    ids, mask = left_padded(model.config.image_token_id, images.lengths)
    logits, kept, _ = forward(graphdef, state, images, ids, mask)
    want = hf_logits(hf, ids, mask, pixel_values=torch.as_tensor(px), image_sizes=torch.as_tensor(sizes))
    ok = mask.astype(bool)
    err = np.abs(np.asarray(logits)[ok] - want[ok]).max()
    print(f"{pair} grids {grids}: max abs err {err:.2e} (max |logit| {np.abs(want[ok]).max():.2f})")
    assert kept is None and err <= 1e-4


def test_variant_config_logits():
    """Other config values through the NeXT path: two feature layers, tied embeddings, MHA, other activations."""
    hf = tiny(seed=2, next=True, vision_feature_layer=[-3, -1], tie_word_embeddings=True, num_key_value_heads=4,
              hidden_act="gelu_pytorch_tanh", projector_hidden_act="quick_gelu", multimodal_projector_bias=False)
    model, graphdef, state = from_hf(hf)
    px, sizes, images = processed(model.config, ("tall", "wide2"), seed=3)
    ids, mask = left_padded(model.config.image_token_id, images.lengths)
    want = hf_logits(hf, ids, mask, pixel_values=torch.as_tensor(px), image_sizes=torch.as_tensor(sizes))
    ok = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(graphdef, state, images, ids, mask)[0])[ok], want[ok], atol=1e-4)


def test_greedy_generation_equals_transformers(base):
    hf, model, graphdef, state = base
    px, sizes, images = processed(model.config, ("square", "wide"), seed=1)
    ids, mask = left_padded(model.config.image_token_id, images.lengths, seed=1)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                           pixel_values=torch.as_tensor(px), image_sizes=torch.as_tensor(sizes), max_new_tokens=12,
                           do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
    out = generate(graphdef, state, images, ids, mask, decoding=Decoding(12))
    np.testing.assert_array_equal(out.tokens, want)


def budgets(counts, k):
    """Largest-remainder shares of k (reference for group_budgets)."""
    total = sum(counts)
    base = [k * c // total for c in counts]
    rem = sorted(range(len(counts)), key=lambda g: (-(k * counts[g] % total), g))
    for g in rem[:k - sum(base)]:
        base[g] += 1
    return base


def ref_kept(feats, order, k, per_view, n, rank):
    """Kept image-token numbers of one image: top-k float64 leverage (uncentred, rank `rank`) over the image's
    tokens alone, or per view over that view's tokens alone with largest-remainder budgets; and the smallest
    score gap at a cut (near-ties would make float32 choose differently)."""
    tokens = order[order >= 0]  # view-major index of each image token, packed order
    if not per_view:
        groups = [np.arange(tokens.size)]
    else:
        view = tokens // n
        groups = [np.flatnonzero(view == v) for v in range(view.max() + 1)]
    kept, gap = [], np.inf
    for members, b in zip(groups, budgets([g.size for g in groups], k) if per_view else [k]):
        s = ref_leverage(feats[tokens[members]], rank=min(rank, members.size))
        top = np.argsort(-s, kind="stable")
        kept += list(members[top[:b]])
        if 0 < b < members.size:
            gap = min(gap, s[top[b - 1]] - s[top[b]])
    return np.sort(kept), gap


@pytest.mark.parametrize("per_view", [False, True], ids=["one_selection", "per_view"])
def test_pruned_forward_matches_transformers_fed_the_kept_features(per_view, base):
    """The kept tokens are the float64 reference's on the image's (view's) own tokens, in packed order, with no
    image_newline; the logits equal transformers' with those tower features projected into the image slots."""
    hf, model, graphdef, state = base
    cfg, k = model.config, 9
    px, sizes, images = processed(cfg, ("wide", "tall"), seed=4)
    ids, mask = left_padded(cfg.image_token_id, [k, k], seed=2)
    pruning = Pruning("svd", k, (("center", False), ("rank", 3)), per_view=per_view)
    logits, kept, _ = forward(graphdef, state, images, ids, mask, pruning=pruning)
    feats = hf_view_features(hf, px)
    n = cfg.side ** 2
    for b, order in enumerate(hf_order(hf, sizes)):
        want, gap = ref_kept(feats[b].astype(np.float64), order, k, per_view, n, 3)
        assert gap > 1e-4
        np.testing.assert_array_equal(kept[b], want)
    with torch.no_grad():
        embeds = hf.model.language_model.embed_tokens(torch.as_tensor(ids))
        chosen = [feats[b][order[order >= 0][np.asarray(kept[b])]] for b, order in enumerate(hf_order(hf, sizes))]
        embeds[torch.as_tensor(ids == cfg.image_token_id)] = hf.model.multi_modal_projector(
            torch.as_tensor(np.concatenate(chosen))).reshape(-1, embeds.shape[-1])
    want = hf_logits(hf, ids, mask, inputs_embeds=embeds)
    ok = mask.astype(bool)
    err = np.abs(np.asarray(logits)[ok] - want[ok]).max()
    print(f"pruned {'per view' if per_view else 'one selection'}: max abs err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("method", ["svd", "random", "norm", "cls_attention", "divprune", "visionzip", "lrcp",
                                    "svd:merge", "divprune:merge"])
def test_every_method_keeps_only_image_tokens(method, base):
    """Both modes of every method: k distinct image tokens of each image (never padding or an unpadded-away
    token), ascending (VisionZip: dominant ascending, then its targets); per view, each view's share."""
    _, model, graphdef, state = base
    cfg, k = model.config, 12
    px, sizes, images = processed(cfg, ("tall3", "wide2"), seed=5)
    name, _, merge = method.partition(":")
    options = (("merge", True),) if merge else ()
    n = cfg.side ** 2
    for per_view in (False, True) if name != "visionzip" else (False,):
        embeds, kept = model.encode_images(jax.tree.map(np.asarray, images), Pruning(name, k, options, per_view=per_view),
                                           key=jax.random.key(0))
        kept = np.asarray(kept)
        assert embeds.shape == (2, k, cfg.text.hidden_size) and np.isfinite(embeds).all()
        for b in range(2):
            count = images.counts[b]
            assert len(set(kept[b])) == k and kept[b].max() < count
            if name != "visionzip":
                assert (np.diff(kept[b]) > 0).all()
            if per_view:
                view = images.tokens[b][kept[b]] // n
                counts = np.bincount(images.tokens[b][:count] // n)
                np.testing.assert_array_equal(np.bincount(view, minlength=counts.size), budgets(list(counts), k))


def test_unpruned_newlines_and_no_recompile_across_aspect_ratios(base):
    """Unpruned, every row of the crop grid ends in image_newline; pruned, the language model sees k tokens and
    no newline. Within one view count (here 3: wide 1 x 2 and tall 2 x 1 grids, each unpadded differently) one
    program serves every aspect ratio; a batch with more views compiles once more."""
    _, model, graphdef, state = base
    cfg = model.config
    newline = np.asarray(model.image_newline[...])
    _, _, images = processed(cfg, ("wide2", "tall"))
    embeds, _ = model.encode_images(jax.tree.map(np.asarray, images))
    for b in range(2):
        slots = np.asarray(embeds[b][:images.lengths[b]])
        is_nl = (slots == newline).all(axis=1)
        grid = anyres.grid_shape(tuple(int(x) for x in SIZES[("wide2", "tall")[b]]), TINY_PINPOINTS, 32)
        assert is_nl.sum() == images.lengths[b] - images.counts[b] and is_nl[-1] and not is_nl[:16].any()
        assert 3 == 1 + grid[0] * grid[1]
    k = 8
    ids, mask = left_padded(cfg.image_token_id, [k, k])
    run = lambda sizes, seed: generate(graphdef, state, layout(cfg, *_pixels(sizes, seed)), ids, mask,
                                       decoding=Decoding(4), pruning=Pruning("svd", k))
    run([(30, 58), (60, 29)], 0)  # compiles here if no earlier test did
    with Compiles("generate_program") as same:
        for seed, sizes in enumerate([[(61, 31), (30, 58)], [(25, 64), (64, 25)], [(31, 62), (62, 30)]]):
            assert all(1 + np.prod(anyres.grid_shape(s, TINY_PINPOINTS, 32)) == 3 for s in sizes)
            out = run(sizes, seed + 1)
            assert out.kept.shape == (2, k)
    assert same.count == 0
    with Compiles("generate_program") as more_views:
        run([(30, 85), (50, 47)], 9)  # 4 and 5 views: the batch holds 5
    assert more_views.count == 1


def _pixels(sizes, seed):
    rng = np.random.default_rng(seed)
    out = processor()(images=[Image.fromarray(rng.integers(0, 255, (*s, 3), dtype=np.uint8)) for s in sizes],
                      return_tensors="np")
    return out["pixel_values"], out["image_sizes"]


def test_bad_input(base):
    _, model, graphdef, state = base
    cfg = model.config
    _, _, images = processed(cfg, ("wide2", "tall"))
    fewest = int(images.counts.min())
    ids, mask = left_padded(cfg.image_token_id, [fewest + 1] * 2)
    with pytest.raises(ValueError, match=rf"k={fewest + 1} outside \[1, {fewest}\]"):
        forward(graphdef, state, images, ids, mask, pruning=Pruning("svd", fewest + 1))
    ids, mask = left_padded(cfg.image_token_id, [5, 5])
    with pytest.raises(ValueError, match="visionzip .* no per-view mode"):
        forward(graphdef, state, images, ids, mask, pruning=Pruning("visionzip", 5, per_view=True))
    with pytest.raises(ValueError, match=r"image tokens per prompt \[5, 5\] differ from the image budget"):
        forward(graphdef, state, images, ids, mask)
    ids, mask = left_padded(cfg.image_token_id, images.lengths)
    fewest = int(images.lengths.min())  # FastV ranks image slots, newlines included
    with pytest.raises(ValueError, match=rf"FastV keep {fewest + 1} outside \[1, {fewest}\]"):
        forward(graphdef, state, images, ids, mask, fastv=FastV(fewest + 1, 1))
    with pytest.raises(ValueError, match="pixel_values shape"):
        layout(cfg, np.zeros((2, 3, 3, 28, 28), np.float32), [(30, 58), (60, 29)])
    with pytest.raises(ValueError, match="has 5 views"):
        layout(cfg, np.zeros((1, 3, 3, 32, 32), np.float32), [(50, 47)])
    d = base[0].config.to_dict()
    with pytest.raises(ValueError, match="multiples of the tower's image_size 32"):
        config_from_hf(dict(d, image_grid_pinpoints=[[32, 48]]))
    with pytest.raises(ValueError, match="needs vision_feature_select_strategy 'default'"):
        config_from_hf(dict(d, vision_feature_select_strategy="full"))
    with pytest.raises(ValueError, match="model_type 'qwen2_vl' is not one of llava, llava_next"):
        config_from_hf(dict(d, model_type="qwen2_vl"))
    assert isinstance(config_from_hf(d), LlavaNextConfig)


# --- FastV and adaptive budgets --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep():
    """A 3-layer decoder: FastV at K = 1 and K = 2."""
    hf = tiny(seed=5, next=True, text_layers=3)
    return hf, *from_hf(hf)


def hf_embeds(hf, px, sizes, ids) -> torch.Tensor:
    """transformers' input embeddings: its packed image features (newlines included) scattered into the image slots,
    as its forward does."""
    m, c = hf.model, hf.config
    with torch.no_grad():
        feats = m.get_image_features(torch.as_tensor(px), torch.as_tensor(sizes), vision_feature_layer=c.vision_feature_layer,
                                     vision_feature_select_strategy=c.vision_feature_select_strategy).pooler_output
        ids = torch.as_tensor(ids)
        return m.get_input_embeddings()(ids).masked_scatter((ids == c.image_token_id)[..., None], torch.cat(list(feats)))


def hf_fastv_row(hf, embeds, ids, K, keep, prompt=None):
    """One row alone, unpadded: FastV by hand on transformers' layers (`hf_fastv`) over every image slot of its
    first `prompt` columns (image_newline included), ranked by column prompt - 1: (logits (T', V), kept columns)."""
    T = embeds.shape[0]
    prompt = T if prompt is None else prompt
    cols = np.flatnonzero(np.asarray(ids[:prompt]) == hf.config.image_token_id)[None]
    with torch.no_grad():
        h, kept = hf_fastv(hf, embeds[None].numpy(), np.ones((1, T), bool), np.arange(T)[None], cols, K, keep, query=prompt - 1)
        return hf.lm_head(torch.as_tensor(h[0])).numpy(), kept[0]


def hf_fastv_greedy(hf, embeds, ids, K, keep, steps) -> list[int]:
    """Greedy tokens of one row: the whole FastV forward by hand again after every token (the prompt's last
    token keeps ranking the image slots; later tokens attend to the kept columns only from layer K on)."""
    prompt, tokens = embeds.shape[0], []
    for _ in range(steps):
        logits, _ = hf_fastv_row(hf, embeds, ids, K, keep, prompt)
        tokens.append(int(logits[-1].argmax()))
        with torch.no_grad():
            embeds = torch.cat([embeds, hf.model.get_input_embeddings()(torch.tensor(tokens[-1:]))])
        ids = np.append(ids, tokens[-1])
    return tokens


@pytest.mark.parametrize("pair,K,keep", [(("wide", "tall"), 1, 24), (("square", "tall3"), 2, 60)])
def test_fastv_matches_transformers_layers_driven_by_hand(pair, K, keep, deep):
    """FastV on two grids in a batch (left-padded prompts with different image slot counts): each row keeps `keep`
    of its own image slots, image_newline included, ranked by its last token's attention at layer K - 1; the
    logits of the kept columns equal transformers' layers driven by hand on each row alone, and so do the greedy
    tokens. The prompts need the view count's image slots plus the longest text (`generate` pads them so)."""
    hf, model, graphdef, state = deep
    cfg = model.config
    px, sizes, images = processed(cfg, pair, seed=10)
    ids, mask = left_padded(cfg.image_token_id, images.lengths, seed=3)
    S = images.packed.shape[1]  # image slots of the bucket: the most an image of this view count fills
    assert S == anyres.bounds(TINY_PINPOINTS, 32, 4, views=px.shape[1])[2] and images.lengths.min() < S
    width = S + int((mask.sum(1) - images.lengths).max())
    with pytest.raises(ValueError, match=f"FastV on this batch needs prompts of at least {width} columns"):
        forward(graphdef, state, images, ids, mask, fastv=FastV(keep, K))
    pad = ((0, 0), (width - ids.shape[1], 0))
    padded, padded_mask = np.pad(ids, pad), np.pad(mask, pad)
    logits, kept, columns = forward(graphdef, state, images, padded, padded_mask, fastv=FastV(keep, K))
    assert kept is None and columns.shape == logits.shape[:2] == (2, width - S + keep)
    embeds = hf_embeds(hf, px, sizes, padded)
    err, newlines = 0.0, 0
    for b in range(2):
        real = padded_mask[b].astype(bool)
        want, want_cols = hf_fastv_row(hf, embeds[b][real], padded[b][real], K, keep)
        got = np.asarray(columns[b])
        ok = real[got]  # the columns every row keeps past its own: left padding
        np.testing.assert_array_equal(got[ok] - (~real).sum(), want_cols)
        err = max(err, float(np.abs(np.asarray(logits[b])[ok] - want).max()))
        slots = np.flatnonzero(padded[b][real] == cfg.image_token_id)
        kept_slots = np.searchsorted(slots, np.intersect1d(want_cols, slots))
        newlines += int((images.packed[b][kept_slots] == cfg.num_image_tokens).sum())
    print(f"fastv {pair} K={K} keep={keep}: max abs err {err:.2e}, {newlines} image_newline slots kept")
    assert err <= 1e-4 and newlines > 0  # newlines compete like any image slot, and some win here
    out = generate(graphdef, state, images, ids, mask, decoding=Decoding(5), fastv=FastV(keep, K), bucket=1)
    for b in range(2):
        real = mask[b].astype(bool)
        assert out.tokens[b].tolist() == hf_fastv_greedy(hf, hf_embeds(hf, px[b:b + 1], sizes[b:b + 1], ids[b:b + 1, real])[0],
                                                         ids[b][real], K, keep, 5)


def test_fastv_one_program_across_aspect_ratios_and_all_kept_is_unpruned(deep):
    """FastV pads prompts to the view count's image slots plus the text, so within a view count every aspect ratio
    runs one program (here 3 views: wide 1 x 2 and tall 2 x 1 grids, unpadded differently; an 8-column bucket,
    which the image slot counts alone would change); keeping every image slot of a lone image is the unpruned
    model (the padding the row drops at layer K never mattered)."""
    _, model, graphdef, state = deep
    cfg = model.config

    def run(sizes, seed, fastv=FastV(20, 1)):
        images = layout(cfg, *_pixels(sizes, seed))
        ids, mask = left_padded(cfg.image_token_id, images.lengths)
        return images.lengths, generate(graphdef, state, images, ids, mask, decoding=Decoding(4), fastv=fastv, bucket=8)

    run([(30, 58), (60, 29)], 0)
    longest, shapes = set(), set()
    with Compiles("generate_program") as same:
        for seed, sizes in enumerate([[(61, 31), (30, 58)], [(25, 64), (30, 58)], [(64, 25), (62, 30)]]):
            n, out = run(sizes, seed + 1)
            longest.add(int(n.max()))
            shapes.add(out.kept_columns.shape)
    assert same.count == 0 and len(longest) == 2 and len(shapes) == 1
    for size in ((30, 58), (62, 30)):
        images = layout(cfg, *_pixels([size], 5))
        ids, mask = left_padded(cfg.image_token_id, images.lengths)
        full = np.asarray(forward(graphdef, state, images, ids, mask)[0])[0]
        pad = ((0, 0), (images.packed.shape[1] - int(images.lengths[0]), 0))  # the slots this image leaves empty
        logits, _, columns = forward(graphdef, state, images, np.pad(ids, pad), np.pad(mask, pad),
                                     fastv=FastV(int(images.lengths[0]), 2))
        np.testing.assert_array_equal(columns[0], np.arange(pad[1][0], pad[1][0] + ids.shape[1]))
        err = np.abs(np.asarray(logits)[0][mask[0] > 0] - full[mask[0] > 0]).max()
        print(f"fastv keeping all {images.lengths[0]} slots of {size}: max abs err to unpruned {err:.2e}")
        assert err <= 1e-5


@pytest.mark.parametrize("matrix", ["tower", "projector"])
def test_adaptive_budget_reads_each_images_own_tokens(matrix, deep):
    """`adaptive_keep` on NeXT: each image's budget is the float64 leverage-mass rule (`ref_adaptive`) on its own
    tokens alone (base view and unpadded crops in packed order; the padding rows of the (B, T) token array, copies
    of token 0, do not count), at several targets and two rank rules."""
    hf, model, graphdef, state = deep
    _, sizes, images = processed(model.config, ("wide2", "square"), seed=11)  # 48 and 80 of T = 80 tokens
    with torch.no_grad():
        hf64 = copy.deepcopy(hf).double()
        feats = hf_view_features(hf64, images.pixel_values.astype(np.float64))
        if matrix == "projector":
            feats = hf64.model.multi_modal_projector(torch.as_tensor(feats)).numpy()
    tokens = [order[order >= 0] for order in hf_order(hf, sizes)]
    buckets, checked, seen = (4, 8, 16, 32, 48), 0, set()
    for rule in (dict(energy=0.9, center=True), dict(rank=3)):
        for target in (0.3, 0.5, 0.7, 0.9):
            got = adaptive_keep(graphdef, state, images, target, buckets, matrix=matrix, rule=tuple(sorted(rule.items())))
            for b, t in enumerate(tokens):
                want = ref_adaptive(feats[b][t], target, buckets, **rule)
                # compare only where the float64 answer is not on a knife edge between two buckets
                if all(ref_adaptive(feats[b][t], x, buckets, **rule) == want for x in (target - 1e-4, target + 1e-4)):
                    assert got[b] == want, (rule, target, b)
                    checked, seen = checked + 1, seen | {want}
    assert checked >= 12 and len(seen) >= 3


# --- conversion: llava-hf NeXT directories (both key layouts, sharded) -> ours -> back -----------------------------

@pytest.mark.parametrize("key_layout", ["legacy_sharded", "v5_sharded"])
def test_conversion_round_trip_is_bit_identical(key_layout, tmp_path):
    """HF -> ours -> HF gives back every tensor bit for bit (image_newline included, in the hub's layout);
    transformers loads the export to the same logits, and ours (either directory) to transformers' within 1e-4."""
    hf = tiny(seed=1, next=True)
    src = save(hf, tmp_path / "hf", key_layout)
    processor().save_pretrained(src)  # NeXT's processor in place of the CLIP one save() writes
    assert (src / INDEX).is_file()
    assert any("image_newline" in k for k in read_checkpoint(src))
    convert.convert_checkpoint(src, tmp_path / "ours", progress=False)
    convert.export_checkpoint(tmp_path / "ours", tmp_path / "back", max_shard_bytes=50_000, progress=False)
    before = {keymap.canonical_key(k): t for k, t in read_checkpoint(src).items()}
    after = read_checkpoint(tmp_path / "back")
    assert set(after) == set(before) and "image_newline" in after
    for k, t in before.items():
        assert after[k].dtype == t.dtype and after[k].shape == t.shape
        assert after[k].load().tobytes() == t.load().tobytes(), k
    back = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert back.config.image_grid_pinpoints == hf.config.image_grid_pinpoints
    cfg = config_from_hf(hf.config.to_dict())
    px, sizes, images = processed(cfg, ("wide", "square"), seed=6)
    ids, mask = left_padded(cfg.image_token_id, images.lengths)
    kw = dict(pixel_values=torch.as_tensor(px), image_sizes=torch.as_tensor(sizes))
    want = hf_logits(hf, ids, mask, **kw)
    np.testing.assert_array_equal(hf_logits(back, ids, mask, **kw), want)
    ok = mask.astype(bool)
    for path in (tmp_path / "ours", src):
        model = convert.load_model(path)
        assert isinstance(model.config, LlavaNextConfig)
        got = forward(*nnx.split(model), images, ids, mask)[0]
        np.testing.assert_allclose(np.asarray(got)[ok], want[ok], rtol=0, atol=1e-4)
    assert transformers.LlavaNextImageProcessorPil.from_pretrained(convert.processor_path(tmp_path / "back")
                                                                    ).image_grid_pinpoints == TINY_PINPOINTS


def test_truncated_shard_is_refused_and_nothing_is_left(tmp_path):
    hf = tiny(seed=1, next=True)
    src = write_hf(tmp_path / "hf", hf.config.to_dict(), v5_state(hf), shards=3)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    for act in (lambda: convert.convert_checkpoint(src, tmp_path / "out", progress=False),
                lambda: convert.load_model(src)):
        with pytest.raises(ValueError, match=rf"{shard.name}: truncated safetensors file"):
            act()
    assert no_leftovers(tmp_path, "out")


# --- the pipeline and `svdprune-jax run` on a NeXT directory --------------------------------------------------------

def word_tokenizer():
    """Words w0..w126 and the special token <image> (id 127, the tiny configs' image token)."""
    vocab = {f"w{i}": i for i in range(127)} | {"<image>": 127}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", pad_token="w0", eos_token="w2",
                                                additional_special_tokens=["<image>"])


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """A llava-hf style NeXT directory (save_pretrained), its tokenizer and processor; 3 decoder layers (FastV's
    default layer is 2)."""
    hf = tiny(seed=3, next=True, text_layers=3)
    d = tmp_path_factory.mktemp("next") / "llava-next"
    hf.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    processor().save_pretrained(d)
    return hf, d


def test_pipeline_answers_as_transformers_processor_and_generate(next_dir):
    """Unpruned, the pipeline's answers are transformers' LlavaNextProcessor + generate on the same images and
    questions (the processor expands each <image> itself); pruned, each prompt carries `keep` image tokens and the
    kept indices are the image's token numbers."""
    hf, d = next_dir
    pipe = Pipeline.load(d)
    assert pipe.is_next and pipe.num_image_tokens == 16 + 4 * 16  # base + a 2 x 2 grid of crops
    images, questions = pictures(("wide", "tall3"), seed=7), ["w5 w9 w11", "w7"]
    answers, _ = pipe.answer(images, questions, method="full", max_new_tokens=6)
    tok = word_tokenizer()
    tok.padding_side = "left"
    hf_proc = transformers.LlavaNextProcessor(image_processor=processor(), tokenizer=tok, patch_size=8,
                                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    inputs = hf_proc(images=images, text=[CHAT_TEMPLATE.format(question=q) for q in questions], padding=True,
                     return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    for ans, row in zip(answers, want[:, inputs["input_ids"].shape[1]:].tolist()):
        n = len(ans.token_ids)  # up to and with EOS; transformers pads the rest of the row
        assert n >= 1 and ans.token_ids == row[:n] and set(row[n:]) <= {0}
    counts = pipe.image_token_counts(images)
    pruned, _ = pipe.answer(images, questions, method="svd:per_view=true", keep=10, max_new_tokens=3)
    for ans, count in zip(pruned, counts):
        assert len(ans.kept_indices) == 10 and ans.kept_indices == sorted(ans.kept_indices) and ans.kept_indices[-1] < count
    fastv, _ = pipe.answer(images, questions, method="fastv", keep=10, max_new_tokens=3)
    assert all(a.kept_indices is None and len(a.token_ids) >= 1 for a in fastv)


def test_run_command_on_a_next_directory_and_its_conversion(next_dir, tmp_path, capsys):
    """`svdprune-jax run --model DIR` on the llava-hf directory and on its conversion: the same answer, and the
    kept-token picture of the answer's kept indices (`anyres_overlay`, tested in test_pictures.py)."""
    _, d = next_dir
    image = pictures(("square",), seed=8)[0]
    image.save(tmp_path / "x.png")
    cli.main(["convert", str(d), str(tmp_path / "ours")])
    capsys.readouterr()
    outs = []
    argv = ["--image", str(tmp_path / "x.png"), "--prompt", "w5 w6", "--keep", "9", "--max-new-tokens", "4"]
    for model in (d, tmp_path / "ours"):
        cli.main(["run", "--model", str(model), *argv, "--out", str(tmp_path / "k.png"), "--json"])
        outs.append(json.loads(capsys.readouterr().out))
    out = outs[0]
    assert out["keep"] == 9 and len(out["kept_indices"]) == 9 and out["overlay"] == str(tmp_path / "k.png")
    assert out["image_tokens"] == 16 + 4 * 16  # square 50 x 47: 2 x 2 crops, unpadding drops no column of 8 x 8
    want = anyres_overlay(image, outs[1]["kept_indices"], TINY_PINPOINTS, 32, 8)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "k.png")), np.asarray(want))
    cli.main(["run", "--model", str(d), *argv, "--out", str(tmp_path / "text.png")])
    assert f"picture   {tmp_path / 'text.png'}\n" in capsys.readouterr().out and (tmp_path / "text.png").is_file()
    assert {k: v for k, v in outs[1].items() if k not in ("model", "seconds", "stage_seconds", "compile_seconds",
                                                           "unpruned_seconds")} == \
           {k: v for k, v in out.items() if k not in ("model", "seconds", "stage_seconds", "compile_seconds",
                                                      "unpruned_seconds")}


def test_run_fastv_and_adaptive_on_a_next_directory(next_dir, tmp_path, capsys):
    """`run --method fastv` and `--method svd:adaptive=0.9` on a NeXT directory: FastV keeps its budget of image
    slots (no kept indices, no picture); the adaptive spec answers at the image's own bucket, the pipeline's."""
    _, d = next_dir
    image = pictures(("tall3",), seed=12)[0]
    image.save(tmp_path / "x.png")
    run = ["run", "--model", str(d), "--image", str(tmp_path / "x.png"), "--prompt", "w5 w6", "--max-new-tokens", "3"]
    cli.main([*run, "--method", "fastv", "--keep", "30", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["keep"], out["kept_indices"], out["overlay"]) == (30, None, None) and out["token_ids"]
    cli.main([*run, "--method", "fastv"])
    assert "picture   none: fastv keeps every patch" in capsys.readouterr().out
    cli.main([*run, "--method", "svd:adaptive=0.9", "--keep", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    want = int(Pipeline.load(d).adaptive_keep([image], "svd:adaptive=0.9", 16)[0])
    assert out["keep"] == want and want in (2, 4, 8, 16) and len(out["kept_indices"]) == want


@pytest.mark.parametrize("window", [None, 4096])
def test_mistral_text_config_logits_and_window(window, tmp_path):
    """A Mistral decoder (llava-v1.6-mistral-7b-hf's family) is this decoder while a sequence fits its sliding
    window: logits as transformers', the window kept through export; longer prompts are refused."""
    hf = tiny(seed=4, next=True, text_model_type="mistral", sliding_window=window, rope_theta=1e6)
    model, graphdef, state = from_hf(hf)
    text = model.config.text
    assert (text.model_type, text.sliding_window, text.rope_theta) == ("mistral", window, 1e6)
    px, sizes, images = processed(model.config, ("square", "wide"), seed=9)
    ids, mask = left_padded(model.config.image_token_id, images.lengths)
    want = hf_logits(hf, ids, mask, pixel_values=torch.as_tensor(px), image_sizes=torch.as_tensor(sizes))
    ok = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(graphdef, state, images, ids, mask)[0])[ok], want[ok], atol=1e-4)
    assert config_from_hf(convert.config_to_hf(model.config, "float32")) == model.config
    if window is not None:
        small = config_from_hf(dict(hf.config.to_dict(), text_config=dict(hf.config.text_config.to_dict(),
                                                                          sliding_window=50)))
        assert small.text.context == 50
        with pytest.raises(ValueError, match="exceeds the sliding window of 50"):
            check_prompts(small, ids, mask, images.lengths)


def test_eval_gqa_on_a_next_directory(next_dir, tmp_path):
    """`svdprune-jax eval gqa --model DIR` answers every question unpruned, pruned per view and with FastV on a NeXT
    model (batches of images of different grids; a random model, so only the run's shape is checked)."""
    _, d = next_dir
    rows = evaluate.main(["gqa", "--data", str(write_gqa(tmp_path / "gqa")), "--model", str(d), "--methods",
                          "svd:per_view=true,fastv", "--keep", "10", "--out", str(tmp_path / "out"), *RUN, *CHAT])
    assert [(r.method, r.budget, r.count, r.skipped) for r in rows] == [("full", None, 6, 1),
                                                                         ("svd:per_view=true", 10, 6, 1),
                                                                         ("fastv", 10, 6, 1)]


def test_eval_synthetic_refuses_a_next_directory_in_one_line(next_dir, tmp_path):
    """The synthetic benchmark (its masks, oracle, recall and kept-token grid) is one view's patches: a NeXT model is
    refused, saying so, before it loads and before --out is made, rather than by a token-count mismatch."""
    _, d = next_dir
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "synthetic", "--model", str(d), "--n", "2", "--budgets", "20", "--out", str(tmp_path / "s")])
    assert "\n" not in e.value.code and "eval synthetic takes LLaVA-1.5 models only" in e.value.code
    assert not (tmp_path / "s").exists()


def test_given_scores_keep_the_highest_image_tokens(base):
    """Method GIVEN (an oracle's per-token scores over the packed tokens): padding never wins, even scored highest."""
    _, model, _, _ = base
    _, _, images = processed(model.config, ("wide2", "square"))
    T = model.config.num_image_tokens
    scores = np.tile(np.arange(T, dtype=np.float32), (2, 1))  # the padding at the end scores highest
    _, kept = model.encode_images(jax.tree.map(np.asarray, images), Pruning(GIVEN, 6), scores=scores)
    for b, count in enumerate(images.counts):
        np.testing.assert_array_equal(kept[b], np.arange(count - 6, count))
