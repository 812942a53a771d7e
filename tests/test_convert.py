"""convert/: tiny random transformers LLaVA checkpoints (both key layouts, single file and sharded) -> ours ->
back, checked against transformers' logits, a test-local walk of the HF state_dict (not convert/'s key table) and
the source bytes; every bad input a clear error, nothing left behind."""
import copy
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx, traverse_util
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

import svdprune_jax.convert as convert
from svdprune_jax.convert import keymap
from svdprune_jax.convert.checkpoint import PARAMS, UNUSED
from svdprune_jax.convert.safetensors_io import INDEX, SINGLE, read_checkpoint, read_header, write_file
from hf_reference import hf_params, tiny
from svdprune_jax.models import llava


def add_assets(d):
    """A real (tiny) tokenizer and image processor, so asset copying is checked by loading them."""
    tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3").save_pretrained(d)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor.save_pretrained(d)


def v5_state(hf) -> dict[str, np.ndarray]:
    """transformers 5 `model.state_dict()` keys (model.vision_tower.*, model.language_model.*, lm_head.*)."""
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:  # the tied duplicate, as save_pretrained drops it too
        del sd["lm_head.weight"]
    return sd


def write_hf(d, config: dict, tensors: dict[str, np.ndarray], shards: int = 1):
    """An HF directory written with the safetensors library directly (sharded: round-robin + index)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    if shards == 1:
        safetensors.numpy.save_file(tensors, d / SINGLE, metadata={"format": "pt"})
        return d
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    where = {k: names[j % shards] for j, k in enumerate(tensors)}
    for n in names:
        shard = {k: v for k, v in tensors.items() if where[k] == n}
        safetensors.numpy.save_file(shard, d / n, metadata={"format": "pt"})
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": where}))
    return d


def save(hf, d, layout: str):
    """legacy: transformers 5 save_pretrained (language_model.model.*, lm_head under language_model, vision_tower.*
    without vision_model), optionally sharded; v5: model.state_dict() keys. The hub's own layout (with
    vision_model) is what export writes, converted again in the round-trip test. `hf` is left as it was
    (save_pretrained writes into its config)."""
    if layout.startswith("legacy"):
        copy.deepcopy(hf).save_pretrained(d, max_shard_size="60KB" if layout.endswith("sharded") else "5GB")
    else:
        write_hf(d, hf.config.to_dict(), v5_state(hf), shards=3 if layout.endswith("sharded") else 1)
    add_assets(d)
    return d


# Scaled (hf_reference.tiny) so that attention is far from uniform and logits are O(1): a swapped or untransposed
# square matrix then moves them far past the tolerances. Heads differ from key/value heads (GQA).
@pytest.fixture(scope="module")
def hf():
    return tiny(seed=0)


def make_inputs(hf, seed=0):
    """One prompt (BOS, text, every image token, text) and one random image."""
    cfg, rng = llava.LlavaConfig.from_hf(hf.config.to_dict()), np.random.default_rng(seed)
    text = rng.integers(3, cfg.image_token_id, size=6)
    ids = np.concatenate([[1], text[:2], np.full(cfg.num_image_tokens, cfg.image_token_id), text[2:]])[None]
    v = cfg.vision
    return ids, rng.standard_normal((1, v.num_channels, v.image_size, v.image_size)).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(hf):
    return make_inputs(hf)


def hf_logits(model, inputs) -> np.ndarray:
    ids, px = inputs
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(px)).logits.numpy()


def our_logits(model, inputs) -> np.ndarray:
    ids, px = inputs
    return np.asarray(llava.forward(*nnx.split(model), px, ids)[0])


def no_leftovers(parent, name):
    """Neither the output directory nor a temporary sibling of it exists."""
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp-")]


# --- safetensors reading and writing, against the safetensors library ------------------------------------------

def test_reader_and_writer_agree_with_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
              "c.d": np.arange(6, dtype=np.int64).reshape(2, 3), "e": np.zeros((0, 4), np.float32)}
    safetensors.numpy.save_file(arrays, tmp_path / "lib.safetensors")
    ours = read_header(tmp_path / "lib.safetensors")
    assert {k: (t.dtype, t.shape) for k, t in ours.items()} == {k: (a.dtype, a.shape) for k, a in arrays.items()}
    assert all(np.array_equal(ours[k].load(), a) for k, a in arrays.items())
    bf16 = torch.randn(4, 3, dtype=torch.bfloat16)
    arrays["f"] = bf16.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    write_file(tmp_path / "ours.safetensors", [(k, a.shape, a.dtype, lambda a=a: a) for k, a in arrays.items()])
    back = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert torch.equal(back["f"], bf16)
    assert all(np.array_equal(back[k].numpy(), a) for k, a in arrays.items() if k != "f")


# --- the key table and the parameter tree contract --------------------------------------------------------------

def spec_tree(cfg: llava.LlavaConfig, depth: int) -> dict:
    """spec.md's parameter tree, written out independently of models/ (shapes only)."""
    v, t = cfg.vision, cfg.text
    Dv, Dm, D, F, L = v.hidden_size, v.intermediate_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers
    lin = lambda *s, bias=True: {"kernel": s, **({"bias": s[:-2] + s[-1:]} if bias else {})}
    ln = lambda *s: {"scale": s, "bias": s}
    tree = {
        "vision_tower": {
            "embeddings": {"patch_embedding": {"kernel": (v.patch_size, v.patch_size, v.num_channels, Dv)},
                           "class_embedding": (Dv,), "position_embedding": {"embedding": (1 + v.num_patches, Dv)}},
            "pre_layrnorm": ln(Dv),
            "layers": {"layer_norm1": ln(depth, Dv), "layer_norm2": ln(depth, Dv),
                       "self_attn": {p: lin(depth, Dv, Dv) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
                       "mlp": {"fc1": lin(depth, Dv, Dm), "fc2": lin(depth, Dm, Dv)}}},
        "multi_modal_projector": {"linear_1": lin(Dv * cfg.num_feature_layers, D), "linear_2": lin(D, D)},
        "language_model": {
            "embed_tokens": {"embedding": (t.vocab_size, D)},
            "layers": {"input_layernorm": {"scale": (L, D)}, "post_attention_layernorm": {"scale": (L, D)},
                       "self_attn": {"q_proj": lin(L, D, t.num_attention_heads * t.head_dim, bias=False),
                                     "k_proj": lin(L, D, t.num_key_value_heads * t.head_dim, bias=False),
                                     "v_proj": lin(L, D, t.num_key_value_heads * t.head_dim, bias=False),
                                     "o_proj": lin(L, t.num_attention_heads * t.head_dim, D, bias=False)},
                       "mlp": {"gate_proj": lin(L, D, F, bias=False), "up_proj": lin(L, D, F, bias=False),
                               "down_proj": lin(L, F, D, bias=False)}},
            "norm": {"scale": (D,)}},
    }
    if not t.tie_word_embeddings:
        tree["lm_head"] = {"kernel": (D, t.vocab_size)}
    return tree


@pytest.mark.parametrize("cfg, depth", [(llava.LLAVA_15_7B, 23),
                                        (dataclasses.replace(llava.LLAVA_15_7B, vision_feature_layer=(-3, 5)), 22)])
def test_model_tree_is_the_spec_tree_and_every_param_has_a_rule(cfg, depth):
    abstract = convert.abstract_params(convert.abstract_model(cfg, "bfloat16"))
    shapes = jax.tree.map(lambda a: tuple(a.shape), abstract)
    assert shapes == jax.tree.map(tuple, spec_tree(cfg, depth), is_leaf=lambda x: isinstance(x, tuple))
    assert {a.dtype for a in jax.tree.leaves(abstract)} == {np.dtype(ml_dtypes.bfloat16)}
    assert set(traverse_util.flatten_dict(abstract)) <= set(keymap.BY_PATH)


def test_every_layout_spells_the_same_canonical_key():
    fc1, o_proj, post = "encoder.layers.3.mlp.fc1.weight", "layers.11.self_attn.o_proj.weight", "post_layernorm.bias"
    for other, legacy in [(f"model.vision_tower.{fc1}", f"vision_tower.vision_model.{fc1}"),
                          (f"vision_tower.{fc1}", f"vision_tower.vision_model.{fc1}"),
                          (f"model.vision_tower.vision_model.{post}", f"vision_tower.vision_model.{post}"),
                          (f"model.language_model.{o_proj}", f"language_model.model.{o_proj}"),
                          ("model.multi_modal_projector.linear_2.bias", "multi_modal_projector.linear_2.bias"),
                          ("lm_head.weight", "language_model.lm_head.weight")]:
        assert keymap.canonical_key(other) == keymap.canonical_key(legacy) == legacy
    for bad in ("model.language_model.layers.x.mlp.up_proj.weight", "language_model.lm_head.bias", "vision_tower.foo"):
        with pytest.raises(ValueError, match="unknown"):
            keymap.canonical_key(bad)


# --- HF -> ours: logits equal to transformers --------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["legacy", "legacy_sharded", "v5", "v5_sharded"])
def test_convert_then_load_gives_transformers_logits(hf, inputs, tmp_path, layout):
    src = save(hf, tmp_path / "hf", layout)
    assert (src / INDEX).is_file() == layout.endswith("sharded")
    summary = convert.convert_checkpoint(src, tmp_path / "ours", progress=False)
    # -2 of 3 vision layers: the tower holds 2; layer 2 and post_layernorm are skipped on purpose and reported
    assert "vision layers past vision_feature_layer" in summary and "post_layernorm" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]
    want = hf_logits(hf, inputs)
    for path in (tmp_path / "ours", src):  # our directory and the HF one load alike
        model = convert.load_model(path)
        assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
        np.testing.assert_allclose(our_logits(model, inputs), want, rtol=0, atol=1e-5)


def assert_params_equal(model, hf, torch_dtype, depth):
    """Bitwise equal to the HF tensors cast by torch (bfloat16 compared as bits), mapped by hf_reference's own
    walk of the state_dict (vision layers cut at `depth`, the tied lm_head and post_layernorm left out)."""
    got = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    bits = lambda t: t.detach().to(torch_dtype).view(torch.int16 if torch_dtype == torch.bfloat16 else torch_dtype)
    cfg = llava.LlavaConfig.from_hf(hf.config.to_dict())
    want = traverse_util.flatten_dict(hf_params(hf, cfg, depth, lambda t: bits(t).numpy()))
    assert set(got) == set(want)
    for p, a in got.items():
        a = np.asarray(a)
        assert np.array_equal(a.view(np.int16) if a.dtype == ml_dtypes.bfloat16 else a, want[p]), p


@pytest.mark.parametrize("overrides, depth", [(dict(tie_word_embeddings=True), 2),
                                               (dict(vision_feature_layer=[-4, -1]), 3)])
def test_convert_tied_embeddings_and_multi_layer_features(tmp_path, overrides, depth):
    model = tiny(seed=1, **overrides)
    summary = convert.convert_checkpoint(save(model, tmp_path / "hf", "v5"), tmp_path / "ours", progress=False)
    assert ("vision layers" in summary) == (depth < 3)
    assert_params_equal(convert.load_model(tmp_path / "ours"), model, torch.float32, depth)


def test_bfloat16_conversion_rounds_like_torch(hf, tmp_path):
    convert.convert_checkpoint(save(hf, tmp_path / "hf", "legacy"), tmp_path / "ours", dtype="bf16", progress=False)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_params_equal(convert.load_model(tmp_path / "ours"), hf, torch.bfloat16, 2)
    # a float32 model on request, from the bfloat16 checkpoint (Orbax casts on restore)
    model = convert.load_model(tmp_path / "ours", dtype="float32")
    assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}


# --- ours -> HF: bit-identical, and transformers gives the same logits ------------------------------------------

@pytest.mark.parametrize("layout, shard_bytes", [("v5", None), ("legacy_sharded", 50_000)])
def test_export_round_trip_is_bit_identical_and_loads_in_transformers(hf, inputs, tmp_path, layout, shard_bytes):
    src = save(hf, tmp_path / "hf", layout)
    convert.convert_checkpoint(src, tmp_path / "ours", progress=False)
    files = convert.export_checkpoint(tmp_path / "ours", tmp_path / "back", max_shard_bytes=shard_bytes, progress=False)
    assert (INDEX in files) == (shard_bytes is not None) and len(files) > 2 * (shard_bytes is not None)
    before = {keymap.canonical_key(k): t for k, t in read_checkpoint(src).items()}
    after = read_checkpoint(tmp_path / "back")
    assert set(after) == set(before)
    for k, t in before.items():
        assert after[k].dtype == t.dtype and after[k].shape == t.shape
        assert after[k].load().tobytes() == t.load().tobytes(), k
    # the export (the hub's layout) converts again to the same params
    convert.convert_checkpoint(tmp_path / "back", tmp_path / "ours2", progress=False)
    flat = lambda p: traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(convert.load_model(p), nnx.Param)))
    first, second = flat(tmp_path / "ours"), flat(tmp_path / "ours2")
    assert set(first) == set(second) and all(np.array_equal(first[k], second[k]) for k in first)
    # a loaded model saved again (as training would) exports to the same tensors
    convert.save_model(convert.load_model(tmp_path / "ours"), tmp_path / "saved", assets_from=tmp_path / "ours")
    convert.export_checkpoint(tmp_path / "saved", tmp_path / "again", progress=False)
    again = read_checkpoint(tmp_path / "again")
    assert set(again) == set(after) and all(again[k].load().tobytes() == after[k].load().tobytes() for k in after)
    assert (tmp_path / "again" / "config.json").read_text() == (tmp_path / "back" / "config.json").read_text()
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    # the source model never went through save_pretrained, which is what writes architectures into a config
    strip = lambda d: {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                       if k not in ("dtype", "_name_or_path", "architectures")}
    assert strip(back.config.to_dict()) == strip(hf.config.to_dict())
    assert back.config.architectures == ["LlavaForConditionalGeneration"]
    np.testing.assert_array_equal(hf_logits(back, inputs), hf_logits(hf, inputs))
    # the tokenizer and image processor travelled along, both ways
    for path in (tmp_path / "ours", tmp_path / "back"):
        assert transformers.AutoTokenizer.from_pretrained(convert.tokenizer_path(path))("w5 w7").input_ids == [5, 7]
        assert transformers.CLIPImageProcessorPil.from_pretrained(convert.processor_path(path)).crop_size.height == 28


def test_config_round_trip():
    for cfg in (llava.LLAVA_15_7B, dataclasses.replace(llava.LLAVA_15_13B, vision_feature_layer=(-3, -1),
                                                             vision_feature_select_strategy="full")):
        d = convert.config_to_hf(cfg, "bfloat16")
        assert llava.LlavaConfig.from_hf(d) == cfg
        assert llava.LlavaConfig.from_hf(transformers.LlavaConfig(**json.loads(json.dumps(d))).to_dict()) == cfg


# --- bad input: one clear error, nothing written -----------------------------------------------------------------

@pytest.fixture(scope="module")
def good(hf):
    return hf.config.to_dict(), v5_state(hf)


def fails(tmp_path, src, match, **kw):
    with pytest.raises(ValueError, match=match):
        convert.convert_checkpoint(src, tmp_path / "out", progress=False, **kw)
    assert no_leftovers(tmp_path, "out")


def test_truncated_file(tmp_path, good):
    src = write_hf(tmp_path / "hf", *good)
    with open(src / SINGLE, "r+b") as f:
        f.truncate((src / SINGLE).stat().st_size - 100)
    fails(tmp_path, src, r"truncated safetensors file: tensor '.*' ends at byte")


def test_corrupt_header(tmp_path, good):
    src = write_hf(tmp_path / "hf", *good)
    raw = bytearray((src / SINGLE).read_bytes())
    raw[8:10] = b"#!"
    (src / SINGLE).write_bytes(bytes(raw))
    fails(tmp_path, src, "corrupt safetensors header")
    (src / SINGLE).write_bytes(b"\xff" * 8 + bytes(raw[8:]))
    fails(tmp_path, src, "corrupt or truncated safetensors file: header length")


def test_missing_shard(tmp_path, good):
    src = write_hf(tmp_path / "hf", *good, shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    fails(tmp_path, src, r"missing shard file\(s\) listed in .*model-00002-of-00003")


def test_missing_and_unknown_keys_are_listed_together(tmp_path, good):
    config, sd = good
    sd = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k and k != "model.language_model.norm.weight"}
    sd["model.language_model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    sd["model.multi_modal_projector.linear_3.bias"] = np.zeros(3, np.float32)
    sd["multi_modal_projector.linear_1.bias"] = sd["model.multi_modal_projector.linear_1.bias"]  # both layouts at once
    with pytest.raises(ValueError) as err:
        convert.convert_checkpoint(write_hf(tmp_path / "hf", config, sd), tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "unknown keys (2)" in msg and "layers.0.mlp.extra.weight" in msg and "linear_3.bias" in msg
    assert "missing params (2)" in msg and "language_model/layers/mlp/up_proj/kernel layers [1]" in msg
    assert "language_model/norm/scale" in msg
    assert "duplicate keys (1)" in msg and "linear_1.bias" in msg
    assert no_leftovers(tmp_path, "out")


def test_wrong_shape_and_non_float_tensor(tmp_path, good):
    config, sd = good
    sd = dict(sd, **{"model.language_model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32),
                     "model.multi_modal_projector.linear_1.bias": np.zeros(32, np.int32)})
    fails(tmp_path, write_hf(tmp_path / "hf", config, sd),
          r"wrong shapes \(1\):\n.*k_proj.weight \[32, 32\] \(linear_transpose\) -> \[32, 32\], "
          r"language_model/layers/self_attn/k_proj/kernel needs \[32, 16\](.|\n)*non-float tensors \(1\)")


def test_layer_past_the_config_is_unknown_not_skipped(tmp_path, good):
    config, sd = good
    sd = dict(sd, **{"model.vision_tower.encoder.layers.3.layer_norm1.bias": np.zeros(32, np.float32)})
    fails(tmp_path, write_hf(tmp_path / "hf", config, sd), r"layers.3.layer_norm1.bias \(layer 3; the model has 2\)")


def test_bad_dtype_request_and_existing_output(tmp_path, good):
    src = write_hf(tmp_path / "hf", *good)
    for bad in ("float16", "int8", "bf32", object()):
        fails(tmp_path, src, "is not supported; use float32 or bfloat16", dtype=bad)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert.convert_checkpoint(src, tmp_path / "out", progress=False)


def test_failure_while_writing_removes_the_temporary_directory(tmp_path, good, monkeypatch):
    src = write_hf(tmp_path / "hf", *good)

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(convert.checkpoint, "write_config", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert.convert_checkpoint(src, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")


def test_restore_refuses_a_checkpoint_that_does_not_fit(hf, tmp_path):
    convert.convert_checkpoint(save(hf, tmp_path / "hf", "v5"), tmp_path / "ours", progress=False)
    cfg = llava.LlavaConfig.from_hf(hf.config.to_dict())
    other = dataclasses.replace(cfg, vision_feature_layer=-1, multimodal_projector_bias=False)
    abstract = convert.abstract_params(convert.abstract_model(other, "float32"))
    with pytest.raises(ValueError, match=r"(?s)unknown multi_modal_projector/linear_1/bias.*vision_tower/layers/mlp/"
                                         r"fc1/kernel: stored \[2, 32, 64\], model needs \[3, 32, 64\]"):
        convert.restore_params(tmp_path / "ours" / PARAMS, abstract)
    assert (tmp_path / "ours" / UNUSED).is_file()
    # without shardings: host numpy arrays; with them: jax arrays laid out as asked (here a 1-device mesh), equal
    abstract = convert.abstract_params(convert.abstract_model(cfg, "bfloat16"))
    host = convert.restore_params(tmp_path / "ours" / PARAMS, abstract)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    sharded = convert.restore_params(tmp_path / "ours" / PARAMS, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=row), abstract))
    for h, d in zip(jax.tree.leaves(host), jax.tree.leaves(sharded)):
        assert type(h) is np.ndarray and h.dtype == ml_dtypes.bfloat16 and d.sharding == row
        assert np.array_equal(h.view(np.int16), np.asarray(d).view(np.int16))
    with pytest.raises(ValueError, match="no tokenizer files"):
        convert.tokenizer_path(tmp_path / "hf" / "..")
