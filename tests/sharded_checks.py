"""Sharded inference on 8 simulated CPU devices against the single-device run of the same checkpoint.

Its own pytest session: XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported,
so tests/test_sharding.py launches `python -m pytest tests/sharded_checks.py` with it (the file name keeps it
out of the main session). For meshes data x model 8x1, 4x2, 2x4, 1x8: every param's `.sharding` and per-device
shard shape as a hand-written layout table has them, logits within 1e-5 (float32), kept tokens and generated tokens
equal; the compiled pruning step holds no collective; bad meshes and batches are clear errors.

Sharded runs take a batch of D prompts (the first D of the reference's 8): one image per device. With more,
several simulated devices run jaxlib 0.10.2's batched LAPACK SVD at once, each blocking an XLA:CPU pool thread
while it waits for its batch chunks queued on that same pool: the run deadlocked (gdb: 8 threads in
ParallelBatchMap / BlockingCounter::Wait) in 3 of 6 sessions. One matrix per call runs inline.

The model: `tiny_sharded`'s (tensor-parallel sizes divisible by 8).
"""
import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import svdprune_jax
from svdprune_jax.convert import export_checkpoint, load_model, save_model
from svdprune_jax.convert.hf_config import write_config
from svdprune_jax.models import sharding, stack
from svdprune_jax.models.generate import Decoding, encode_stage, generate
from svdprune_jax.models.llava import Llava, LlavaConfig, Pruning, forward
from svdprune_jax.models.llava_next import LlavaNextConfig, layout
from tiny_sharded import B, CONFIG, PIXELS, prompts, random_model

if jax.device_count() != 8:
    raise RuntimeError(f"{jax.device_count()} devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                       "(tests/test_sharding.py does)")

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
K, NEW = 5, 8  # image tokens kept, new tokens
MODEL = sharding.MODEL
ROW, COL, REPLICATED = P(MODEL, None), P(None, MODEL), P()  # kernels (in, out): split rows, split columns
# The Megatron layout of one layer's (or an unstacked) param, written out by hand for every param kind, independent
# of the models' own metadata: the first matmul of a block splits its output columns (and bias), the second its
# input rows; embeddings split the vocabulary; norms, the patch conv and positions are replicated.
_TOWER, _LM = ("vision_tower",), ("language_model",)
LAYOUT = {
    _TOWER + ("embeddings", "class_embedding"): REPLICATED,
    _TOWER + ("embeddings", "patch_embedding", "kernel"): REPLICATED,
    _TOWER + ("embeddings", "position_embedding", "embedding"): REPLICATED,
    **{_TOWER + (norm, p): REPLICATED for norm in ("pre_layrnorm", "layers/layer_norm1", "layers/layer_norm2")
       for p in ("scale", "bias")},
    **{_TOWER + ("layers", "self_attn", proj, "kernel"): COL for proj in ("q_proj", "k_proj", "v_proj")},
    **{_TOWER + ("layers", "self_attn", proj, "bias"): P(MODEL) for proj in ("q_proj", "k_proj", "v_proj")},
    _TOWER + ("layers", "self_attn", "out_proj", "kernel"): ROW,
    _TOWER + ("layers", "self_attn", "out_proj", "bias"): REPLICATED,
    _TOWER + ("layers", "mlp", "fc1", "kernel"): COL,
    _TOWER + ("layers", "mlp", "fc1", "bias"): P(MODEL),
    _TOWER + ("layers", "mlp", "fc2", "kernel"): ROW,
    _TOWER + ("layers", "mlp", "fc2", "bias"): REPLICATED,
    ("multi_modal_projector", "linear_1", "kernel"): COL,
    ("multi_modal_projector", "linear_1", "bias"): P(MODEL),
    ("multi_modal_projector", "linear_2", "kernel"): ROW,
    ("multi_modal_projector", "linear_2", "bias"): REPLICATED,
    _LM + ("embed_tokens", "embedding"): ROW,
    _LM + ("layers", "input_layernorm", "scale"): REPLICATED,
    _LM + ("layers", "post_attention_layernorm", "scale"): REPLICATED,
    **{_LM + ("layers", "self_attn", proj, "kernel"): COL for proj in ("q_proj", "k_proj", "v_proj")},
    _LM + ("layers", "self_attn", "o_proj", "kernel"): ROW,
    _LM + ("layers", "mlp", "gate_proj", "kernel"): COL,
    _LM + ("layers", "mlp", "up_proj", "kernel"): COL,
    _LM + ("layers", "mlp", "down_proj", "kernel"): ROW,
    _LM + ("norm", "scale"): REPLICATED,
    ("lm_head", "kernel"): COL,
    ("image_newline",): REPLICATED,  # LLaVA-NeXT's
}
LAYOUT = {tuple(n for part in path for n in part.split("/")): spec for path, spec in LAYOUT.items()}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Our checkpoint (Orbax) of the random model and its HF (safetensors) export."""
    root = tmp_path_factory.mktemp("sharded")
    save_model(random_model(), root / "ours")
    export_checkpoint(root / "ours", root / "hf", progress=False)
    return root / "ours", root / "hf"


def outputs(model: Llava, mesh, b: int = B) -> dict[str, np.ndarray]:
    """For the first b prompts: SVD-pruned logits and kept tokens, SVD-pruned greedy generation (tokens, kept),
    as host arrays."""
    graphdef, state = nnx.split(model)
    (ids, mask), pixels = (a[:b] for a in prompts(K)), PIXELS[:b]
    logits, kept, _ = forward(graphdef, state, pixels, ids, mask, pruning=Pruning("svd", K), mesh=mesh)
    out = generate(graphdef, state, pixels, ids, mask, decoding=Decoding(NEW),
                   pruning=Pruning("svd", K), mesh=mesh)
    return {k: sharding.to_host(v) for k, v in dict(logits=logits, kept=kept, tokens=out.tokens,
                                                    generated_kept=out.kept).items()}


@pytest.fixture(scope="module")
def reference(model_dirs):
    """The single-device run (one device, no mesh), which the main suite checks against transformers."""
    return outputs(stack.per_layer(load_model(model_dirs[0])), None)


def assert_sharded_as_layout(model: Llava, mesh, next_: bool = False):
    """Every param laid out as LAYOUT has it (stacked params: the layer axis in front, not split), each device
    holding that slice's shape, and every kind of param LAYOUT names present."""
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = var.get_value()
        kind = tuple(p for p in path if not isinstance(p, int))  # per-layer params: the layer index dropped
        assert kind in LAYOUT, f"{path}: no hand-written layout"
        stacked = "layers" in kind and not any(isinstance(p, int) for p in path)
        spec = ((None,) if stacked else ()) + tuple(LAYOUT[kind])
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), a.ndim), (path, a.sharding, spec)
        spec += (None,) * (a.ndim - len(spec))
        shard = tuple(n // (mesh.shape[ax] if ax else 1) for n, ax in zip(a.shape, spec))
        assert {s.data.shape for s in a.addressable_shards} == {shard}, (path, shard)
        assert len(a.addressable_shards) == 8
        seen.add(kind)
    assert seen == set(LAYOUT) - ({("image_newline",)} if not next_ else set()), set(LAYOUT) - seen


@pytest.mark.parametrize("data, model_axis", MESHES)
def test_sharded_run_equals_single_device(model_dirs, reference, data, model_axis):
    mesh = sharding.make_mesh(data, model_axis)
    stacked = load_model(model_dirs[0], mesh=mesh)  # Orbax restore straight into the shards
    assert_sharded_as_layout(stacked, mesh)
    model = stack.per_layer(stacked)  # the inference layout Pipeline uses: slices keep their shards
    assert_sharded_as_layout(model, mesh)
    got = outputs(model, mesh, data)
    np.testing.assert_allclose(got["logits"], reference["logits"][:data], rtol=1e-5, atol=1e-5)
    for name in ("kept", "tokens", "generated_kept"):
        np.testing.assert_array_equal(got[name], reference[name][:data], err_msg=name)


def test_hf_checkpoint_loads_into_shards(model_dirs, reference):
    """An HF (safetensors) directory: each param read on the host, only its slices sent to each device."""
    mesh = sharding.make_mesh(4, 2)
    model = stack.per_layer(load_model(model_dirs[1], mesh=mesh))
    assert_sharded_as_layout(model, mesh)
    got = outputs(model, mesh, 4)
    np.testing.assert_allclose(got["logits"], reference["logits"][:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["tokens"], reference["tokens"][:4])


_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")
_GROUPS = re.compile(r"replica_groups=(\{[{}0-9,]*\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?"
                     r"|mesh\[[^\]]*\](?:, device_ids=\([^)]*\)\))? \{[^}]*\})")


def replica_groups(text: str) -> list[list[int]]:
    """Explicit device groups from the spellings in compiled HLO: {{0,1},{2,3}}, iota [G,S]<=[dims]T(perm),
    and Shardy's mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, optionally with device_ids=([dims]T(perm))."""
    if text.startswith("{"):
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([0-9,]*)\}", text[1:-1])]
    if text.startswith("mesh"):
        sizes = [(name, int(n)) for name, n in re.findall(r"'(\w+)'=(\d+)", text)]
        over = re.findall(r"'(\w+)'", text.split("{")[1])
        ids = np.arange(np.prod([n for _, n in sizes]))
        if m := re.search(r"device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\)", text):
            order = ids.reshape([int(d) for d in m[1].split(",")])
            ids = (order.transpose([int(p) for p in m[2].split(",")]) if m[2] else order).ravel()
        ids = ids.reshape([n for _, n in sizes])
        axes = [i for i, (name, _) in enumerate(sizes) if name in over]
        rest = [i for i in range(len(sizes)) if i not in axes]
        return ids.transpose(rest + axes).reshape(-1, np.prod([sizes[i][1] for i in axes])).tolist()
    m = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text)
    dims = [int(d) for d in m[3].split(",")]
    ids = np.arange(np.prod(dims)).reshape(dims)
    if m[4]:
        ids = ids.transpose([int(p) for p in m[4].split(",")])
    return ids.reshape(int(m[1]), int(m[2])).tolist()


def collectives(hlo: str, mesh) -> list[tuple[str, bool]]:
    """(op, spans the data axis) for every collective of compiled HLO on `mesh` (device i sits in data row
    i // model: `make_mesh` lays the 8 CPU devices out in order, checked)."""
    assert mesh.devices.ravel().tolist() == jax.devices()
    model, found = mesh.shape[MODEL], []
    for line in hlo.splitlines():
        if op := _COLLECTIVE.search(line):
            groups = _GROUPS.search(line)
            assert groups, f"collective without readable replica groups: {line}"
            found.append((op[1], any(len({i // model for i in g}) > 1 for g in replica_groups(groups[1]))))
    return found


@pytest.mark.parametrize("data, model_axis", [(8, 1), (4, 2)])
def test_pruning_gathers_nothing_over_the_data_axis(model_dirs, data, model_axis):
    """SVD scores and top-k of a data-sharded batch of features: no collective at all in the compiled step;
    the whole image encoding (tower, pruning, projector): only all-reduces within a data row (tensor parallel)."""
    mesh = sharding.make_mesh(data, model_axis)
    feats, = sharding.put_batch(mesh, np.random.default_rng(2).standard_normal((B, 16, 32)).astype(np.float32))
    with sharding.use(mesh):
        hlo = jax.jit(lambda f: svdprune_jax.prune(f, K, "svd", batch_axis=sharding.DATA)).lower(feats).compile().as_text()
    assert collectives(hlo, mesh) == []
    assert "TopK" in hlo and "gesdd" in hlo  # the step compiled is the real one: CPU LAPACK SVD, XLA TopK
    graphdef, state = nnx.split(stack.per_layer(load_model(model_dirs[0], mesh=mesh)))
    pixels, = sharding.put_batch(mesh, PIXELS)
    with sharding.use(mesh):
        hlo = encode_stage.lower(graphdef, state, pixels, jax.random.key(0), None,
                                pruning=Pruning("svd", K)).compile().as_text()
    found = collectives(hlo, mesh)
    assert not [op for op, over_data in found if over_data], found
    assert {op for op, _ in found} == ({"all-reduce"} if model_axis > 1 else set()), found


def test_replica_group_spellings():
    assert replica_groups("{{0,1},{2,3}}") == [[0, 1], [2, 3]]
    assert replica_groups("[4,2]<=[8]") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert replica_groups("[2,4]<=[4,2]T(1,0)") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert replica_groups("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # mesh position i holds device [0,2,4,6,1,3,5,7][i]
    assert replica_groups("mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_0'}") == \
        [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_bad_mesh_model_axis_and_batch(model_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"mesh data=3,model=2 needs 6 devices; 8 are visible"):
        sharding.make_mesh(3, 2)
    mesh = sharding.make_mesh(1, 8)
    bad = dataclasses.replace(CONFIG, text=dataclasses.replace(CONFIG.text, num_key_value_heads=4))
    (tmp_path / "bad").mkdir()
    write_config(tmp_path / "bad", bad, "float32")  # the check comes before any weight is read
    with pytest.raises(ValueError, match="model axis of 8 does not divide the model's text key/value heads 4"):
        load_model(tmp_path / "bad", mesh=mesh)
    mesh = sharding.make_mesh(4, 2)
    graphdef, state = nnx.split(load_model(model_dirs[0], mesh=mesh))
    ids, mask = prompts(K)
    with pytest.raises(ValueError, match="batch of 6 does not split over data=4: use a multiple of 4"):
        generate(graphdef, state, PIXELS[:6], ids[:6], mask[:6], decoding=Decoding(NEW),
                 pruning=Pruning("svd", K), mesh=mesh)


# LLaVA-NeXT: the same model with 28-pixel tiles; four images (grids 1x2, 2x1, 2x2 and a 2x2 of another
# aspect ratio), each with its own number of views and unpadded tokens, one per device on data=4.
NEXT = LlavaNextConfig(**{f.name: getattr(CONFIG, f.name) for f in dataclasses.fields(LlavaConfig)},
                       image_grid_pinpoints=((28, 56), (56, 28), (56, 56)))
NEXT_SIZES = [(24, 70), (50, 22), (40, 40), (35, 50)]


def test_next_sharded_run_equals_single_device(tmp_path):
    """Unpruned (every image its own prompt length) and pruned (one selection by svd, per view by norm: one SVD
    per device, see the module docstring) logits and kept tokens, and pruned generation, on a 4 x 2 mesh."""
    save_model(random_model(NEXT), tmp_path / "next")
    images = layout(NEXT, np.random.default_rng(2).standard_normal((4, 5, 3, 28, 28)).astype(np.float32), NEXT_SIZES)
    assert len(set(images.lengths.tolist())) == 4
    mesh = sharding.make_mesh(4, 2)
    runs = {}
    for name, m in (("one", None), ("mesh", mesh)):
        model = stack.per_layer(load_model(tmp_path / "next", mesh=m))
        if m is not None:
            assert_sharded_as_layout(model, m, next_=True)
        graphdef, state = nnx.split(model)
        out = {}
        for label, pruning in (("full", None), ("svd", Pruning("svd", K)), ("norm_views", Pruning("norm", K, per_view=True))):
            ids, mask = prompts(K)
            if pruning is None:  # each image's own slot count, left-padded to the longest
                rows = [[1, 5, 6] + [NEXT.image_token_id] * int(n) + [7] * (2 + b) for b, n in enumerate(images.lengths)]
                ids, mask = np.zeros((4, max(map(len, rows))), np.int32), np.zeros((4, max(map(len, rows))), np.int32)
                for b, r in enumerate(rows):
                    ids[b, -len(r):], mask[b, -len(r):] = r, 1
            logits, kept, _ = forward(graphdef, state, images, ids[:4], mask[:4], pruning=pruning, mesh=m)
            out[label] = sharding.to_host(logits), None if kept is None else sharding.to_host(kept)
        ids, mask = (a[:4] for a in prompts(K))
        out["generate"] = sharding.to_host(generate(graphdef, state, images, ids, mask, decoding=Decoding(NEW),
                                                    pruning=Pruning("svd", K), mesh=m).tokens), None
        runs[name] = out
    for label, (logits, kept) in runs["one"].items():
        got_logits, got_kept = runs["mesh"][label]
        if label == "generate":
            np.testing.assert_array_equal(got_logits, logits)
            continue
        np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5, err_msg=label)
        if kept is not None:
            np.testing.assert_array_equal(got_kept, kept, err_msg=label)
