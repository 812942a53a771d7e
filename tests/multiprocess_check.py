"""One of two processes of a multi-process run on the CPU, 4 simulated devices each, joined by
`jax.distributed.initialize` (gloo collectives): tests/test_sharding.py launches both, with
XLA_FLAGS=--xla_force_host_platform_device_count=4 and this checkout on PYTHONPATH.

    python tests/multiprocess_check.py PROCESS_ID PORT MODEL_DIR

A data=4 x model=2 mesh over the 8 devices of both processes: a batch of 4 prompts (one image per device: see
sharded_checks.py on jaxlib 0.10.2's LAPACK deadlock) is split across the processes. Each first makes the single-device run on one of its own devices; then both load the checkpoint
straight into their shards, generate (SVD-pruned, greedy) in step, gather the whole result, check it against
their single-device run and print "ok". (Both restore the reference too: an Orbax restore is a collective.)
"""
import sys

import jax
import numpy as np
from flax import nnx

from svdprune_jax.convert import load_model
from svdprune_jax.models import sharding, stack
from svdprune_jax.models.generate import Decoding, generate
from svdprune_jax.models.llava import Pruning
from tiny_sharded import PIXELS, prompts

K, NEW = 5, 8


def run(model_dir: str, mesh) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(stack.per_layer(load_model(model_dir, mesh=mesh)))
    ids, mask = (a[:4] for a in prompts(K))
    out = generate(graphdef, state, PIXELS[:4], ids, mask, decoding=Decoding(NEW),
                   pruning=Pruning("svd", K), mesh=mesh)
    return dict(tokens=sharding.to_host(out.tokens), kept=sharding.to_host(out.kept))


def main(process_id: int, port: int, model_dir: str):
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    mesh = sharding.make_mesh(4, 2)
    rows = {d.process_index for d in mesh.devices[0]}, {d.process_index for d in mesh.devices[-1]}
    assert rows == ({0}, {1}), f"data rows not split across processes: {mesh.devices}"
    single = run(model_dir, None)
    sharded = run(model_dir, mesh)
    for name in sharded:
        np.testing.assert_array_equal(sharded[name], single[name], err_msg=name)
    print("ok", sharded["tokens"].shape)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
