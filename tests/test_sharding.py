"""models.sharding in this (one-device) session; the 8-device checks (tests/sharded_checks.py) in their own
pytest session, since the XLA flag that simulates 8 CPU devices must be set before jax is imported; and a run
across two processes (tests/multiprocess_check.py)."""
import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from svdprune_jax.convert import save_model
from svdprune_jax.models import sharding
from svdprune_jax.models.llava import LLAVA_15_13B, LLAVA_15_7B
from tiny_sharded import random_model

TESTS = Path(__file__).resolve().parent


CPU_DEVICES = "--xla_force_host_platform_device_count={}"


def test_eight_device_session():
    env = dict(os.environ, XLA_FLAGS=CPU_DEVICES.format(8))
    # faulthandler: a test still running after 200 s dumps every thread's Python stack into the report
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-o",
                          "faulthandler_timeout=200", str(TESTS / "sharded_checks.py")], cwd=TESTS.parent, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert re.search(r"^\d+ passed in", run.stdout.splitlines()[-1]), run.stdout[-2000:]  # none skipped


def test_two_processes(tmp_path):
    """jax.distributed.initialize on localhost: a data=4 x model=2 mesh across two processes of 4 CPU devices
    generates what one device does."""
    save_model(random_model(), tmp_path / "model")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), XLA_FLAGS=CPU_DEVICES.format(4))
    procs = [subprocess.Popen([sys.executable, str(TESTS / "multiprocess_check.py"), str(i), str(port),
                               str(tmp_path / "model")], cwd=TESTS.parent, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
    assert ["ok (4, 8)" in out.splitlines() for out, _ in outs] == [True, True], outs  # gloo logs to stdout too


def test_rules_table():
    assert sharding.logical_spec(("layers", "embed", "heads")) == P(None, None, "model")
    assert sharding.logical_spec(("batch", None, "kv_heads", "mlp", "vocab")) == P("data", None, "model", "model",
                                                                                   "model")
    x = jax.numpy.ones((4, 3))
    assert sharding.constrain(x, "batch", None) is x  # no mesh in context: untouched


@pytest.mark.parametrize("spec, want", [("data=4,model=2", (4, 2)), (" data = 1 , model = 8 ", (1, 8))])
def test_parse_mesh(spec, want):
    assert sharding.parse_mesh(spec) == want


@pytest.mark.parametrize("spec", ["4x2", "model=2,data=4", "data=0,model=8", "data=2", "data=-1,model=2"])
def test_parse_mesh_refuses(spec):
    with pytest.raises(ValueError, match="expected data=D,model=M"):
        sharding.parse_mesh(spec)


def test_mesh_must_cover_the_devices():
    with pytest.raises(ValueError, match=r"mesh data=2,model=1 needs 2 devices; 1 are visible"):
        sharding.make_mesh(2, 1)


def test_model_axis_must_split_whole_heads():
    sharding.check_model_axis(LLAVA_15_7B, 8)  # 32 heads, MLP 11008, vocab 32064: all divide by 8
    sharding.check_model_axis(LLAVA_15_13B, 8)
    with pytest.raises(ValueError, match=r"model axis of 3 does not divide the model's vision attention heads 16, "
                                         r"vision MLP width 4096, text attention heads 32, text key/value heads 32"):
        sharding.check_model_axis(LLAVA_15_7B, 3)
    gqa = dataclasses.replace(LLAVA_15_7B, text=dataclasses.replace(LLAVA_15_7B.text, num_key_value_heads=8))
    with pytest.raises(ValueError, match=r"does not divide the model's text key/value heads 8$"):
        sharding.check_model_axis(gqa, 16)
