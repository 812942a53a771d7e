"""Generation against transformers' `generate` (greedy, float32, left-padded batch), EOS, sampling,
pruned and FastV generation, compilation count within a prompt-length bucket, bad input."""
import jax
import numpy as np
import pytest
import torch

from hf_reference import from_hf, pixels, prompts, tiny
from svdprune_jax.benchmarks.timing import Compiles
from svdprune_jax.models.generate import Decoding, generate
from svdprune_jax.models.llama import FastV
from svdprune_jax.models.llava import Pruning
from svdprune_jax.models.sampling import Sampling

M = 20


@pytest.fixture(scope="module")
def base():
    hf = tiny()
    model, graphdef, state = from_hf(hf)
    cfg = model.config
    ids, mask = prompts(cfg.image_token_id, (cfg.num_image_tokens + 11, cfg.num_image_tokens + 5), cfg.num_image_tokens)
    return hf, graphdef, state, cfg, pixels(cfg, 2), ids, mask


def _hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=M,
                          do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_equals_transformers_generate(base):
    hf, graphdef, state, cfg, px, ids, mask = base
    want = _hf_generate(hf, ids, mask, pixel_values=torch.as_tensor(px), eos_token_id=None)
    out = generate(graphdef, state, px, ids, mask, decoding=Decoding(M))
    assert out.tokens.shape == (2, M) and out.kept is None and out.kept_columns is None
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, [M, M])


def test_eos_stops_rows_like_transformers(base):
    hf, graphdef, state, cfg, px, ids, mask = base
    free = generate(graphdef, state, px, ids, mask, decoding=Decoding(M)).tokens
    eos = int(free[0, 4])  # row 0 stops at step 4 (or earlier if that token came before)
    want = _hf_generate(hf, ids, mask, pixel_values=torch.as_tensor(px), eos_token_id=eos)
    out = generate(graphdef, state, px, ids, mask, decoding=Decoding(M, eos, pad_token_id=0))
    got = np.asarray(out.tokens)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)  # HF stops early once every row is done
    assert (got[:, want.shape[1]:] == 0).all()
    first = [list(r).index(eos) + 1 if eos in r else M for r in np.asarray(free)]
    np.testing.assert_array_equal(out.lengths, first)


def test_no_recompile_within_a_bucket(base):
    _, graphdef, state, cfg, px, _, _ = base
    n = cfg.num_image_tokens

    def run(*lengths, seed=0):
        ids, mask = prompts(cfg.image_token_id, lengths, n, seed)
        generate(graphdef, state, px, ids, mask, decoding=Decoding(M), bucket=64)

    run(n + 11, n + 5)  # this bucket's program, compiled here if no earlier test did
    with Compiles("generate_program") as same:
        for seed, lengths in enumerate([(n + 3, n + 2), (n + 40, n + 20), (64, n + 1)]):  # widths 19..64: one bucket
            run(*lengths, seed=seed)
    assert same.count == 0
    with Compiles("generate_program") as next_bucket:
        run(70, 40)  # 128 wide: exactly one new program
    assert next_bucket.count == 1


def test_sampling_is_keyed_and_top_p_limits_it(base):
    _, graphdef, state, cfg, px, ids, mask = base
    run = lambda key, sampling=Sampling(): np.asarray(generate(graphdef, state, px, ids, mask, key=key,
                                                               decoding=Decoding(M, sampling=sampling)).tokens)
    greedy = run(None)  # the program, compiled here if no earlier test did
    with Compiles("generate_program") as compiles:
        a = run(jax.random.key(1), Sampling(1.0, 0.9))
        np.testing.assert_array_equal(a, run(jax.random.key(1), Sampling(1.0, 0.9)))
        assert (a != run(jax.random.key(2), Sampling(1.0, 0.9))).any()
        np.testing.assert_array_equal(run(jax.random.key(3), Sampling(1.0, 1e-6)), greedy)  # nucleus of one
        np.testing.assert_array_equal(run(jax.random.key(4), Sampling(0.0, 0.5)), greedy)
    assert compiles.count == 0  # temperature, top_p, key are traced: one program


def test_pruned_generate_equals_transformers_on_kept_features(base):
    """Pruned (svd, k=5), timed stages: same tokens as HF generate fed the kept features via inputs_embeds."""
    hf, graphdef, state, cfg, px, _, _ = base
    k = 5
    ids, mask = prompts(cfg.image_token_id, (k + 12, k + 7), k)
    out = generate(graphdef, state, px, ids, mask, decoding=Decoding(M), pruning=Pruning("svd", k), timed=True)
    assert set(out.timings) == {"encode", "prefill", "decode"}
    kept = np.array(out.kept)
    with torch.no_grad():
        feats = hf.model.vision_tower(torch.as_tensor(px), output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = torch.gather(feats, 1, torch.tensor(kept)[..., None].expand(-1, -1, feats.shape[-1]))
        embeds = hf.model.language_model.embed_tokens(torch.as_tensor(ids))
        embeds[torch.as_tensor(ids == cfg.image_token_id)] = hf.model.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
        want = hf.generate(inputs_embeds=embeds, attention_mask=torch.as_tensor(mask), max_new_tokens=M,
                           do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    np.testing.assert_array_equal(out.tokens, want)


def test_fastv_keeping_every_image_token_equals_unpruned(base):
    """FastV with keep = n runs the two-segment cache yet must reproduce plain greedy decoding exactly."""
    hf, graphdef, state, cfg, px, ids, mask = base
    n = cfg.num_image_tokens
    want = generate(graphdef, state, px, ids, mask, decoding=Decoding(M)).tokens
    out = generate(graphdef, state, px, ids, mask, decoding=Decoding(M), fastv=FastV(n, 1))
    np.testing.assert_array_equal(out.tokens, want)
    assert out.kept_columns.shape == (2, 64)  # bucketed prompt, all columns kept


def test_bad_input(base):
    _, graphdef, state, cfg, px, ids, mask = base
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens \+ 240 new tokens exceeds the context of 256"):
        generate(graphdef, state, px, ids, mask, decoding=Decoding(240))
    with pytest.raises(ValueError, match="need an explicit key"):
        generate(graphdef, state, px, ids, mask, decoding=Decoding(M, sampling=Sampling(0.5)))
    with pytest.raises(ValueError, match="image budget 4"):
        generate(graphdef, state, px, ids, mask, decoding=Decoding(M), pruning=Pruning("random", 4))
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match=r"temperature .* must be >= 0 and top_p .* in \(0, 1\]"):
            Sampling(**bad)
    with pytest.raises(ValueError, match="max_new_tokens 0 must be >= 1"):
        Decoding(0)
