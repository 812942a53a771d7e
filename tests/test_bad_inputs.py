"""Bad input through the command line, where the user meets it: one line naming the problem, before any long
work, nothing half-written (docs/bad_inputs.md lists every case)."""
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from svdprune_jax.cli import main as cli
from svdprune_jax.convert import convert_checkpoint, export_checkpoint
from svdprune_jax.inference.pipeline import Pipeline
from svdprune_jax.synthetic.bundled import MODEL_DIR
from tiny_bundled import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bad") / "model")


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model is the start of the long work: a refusal must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(Pipeline, "load", load)


def fails(*argv, match: str):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    assert match in e.value.code, e.value.code
    return e.value.code


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# ---- run

@pytest.mark.parametrize("where, message", [
    ("missing/k.png", "does not exist"),
    ("file.txt/k.png", "is not a directory"),
    ("/sys/x.png", "cannot be written"),
])
def test_run_refuses_an_unwritable_out_before_the_work(model_dir, tmp_path, no_work, where, message):
    (tmp_path / "file.txt").write_text("")
    if where.startswith("/sys") and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    fails("run", "--model", model_dir, "--out", tmp_path / where, match=message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


def test_run_refuses_an_empty_prompt(model_dir, no_work, tmp_path):
    fails("run", "--model", model_dir, "--prompt", "  ", "--out", tmp_path / "k.png", match="--prompt is empty")


def test_run_refuses_an_image_claiming_30000_squared_pixels(model_dir, tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    fails("run", "--model", model_dir, "--image", tmp_path / "bomb.png", "--out", tmp_path / "k.png",
          match="too large to decode safely")


def test_config_json_that_is_a_list(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    fails("run", "--model", tmp_path, match="expected a JSON object of config keys, got a JSON list")
    fails("convert", tmp_path, tmp_path / "out", match="got a JSON list")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def damaged(model_dir, tmp_path_factory):
    """Copies of the tiny converted checkpoint: the largest params data file deleted, or truncated."""
    import shutil
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for how in ("deleted", "truncated", "no_metadata"):
        d = shutil.copytree(model_dir, root / how)
        data = max((p for p in (d / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        if how == "deleted":
            data.unlink()
        elif how == "truncated":
            data.write_bytes(data.read_bytes()[:1000])
        else:
            (d / "params" / "_METADATA").unlink()
        out[how] = d
    return out


@pytest.mark.parametrize("how", ["deleted", "truncated", "no_metadata"])
def test_damaged_checkpoint_one_line(damaged, how, tmp_path):
    code = fails("run", "--model", damaged[how], "--out", tmp_path / "k.png", match="cannot be read")
    assert str(damaged[how]) in code
    fails("export", damaged[how], tmp_path / "hf", match="cannot be read")
    assert list(tmp_path.iterdir()) == []


def test_damaged_checkpoint_prints_no_traceback(damaged, tmp_path):
    """Orbax's reads still in flight after the failure used to print 'Event loop is closed' tracebacks."""
    for _ in range(3):  # the late callbacks race the exit
        done = subprocess.run([sys.executable, "-m", "svdprune_jax.cli.main", "run", "--model",
                               str(damaged["truncated"]), "--out", str(tmp_path / "k.png")],
                              capture_output=True, text=True, env=dict(os.environ, SVDPRUNE_JAX_CACHE="off"))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_weights_of_nan_bytes_are_refused_at_load(model_dir, tmp_path):
    """Random bytes under a valid safetensors header answered "" with ids [0, 0, ...]: now refused."""
    hf = tmp_path / "hf"
    export_checkpoint(model_dir, hf, progress=False)
    path = hf / "model.safetensors"
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = b"\xff" * (len(raw) - start)  # every float NaN
    path.write_bytes(bytes(raw))
    fails("run", "--model", hf, "--out", tmp_path / "k.png", match="holds NaN or inf")
    fails("convert", hf, tmp_path / "ours", match="holds NaN or inf")
    assert not (tmp_path / "ours").exists() and not (tmp_path / "k.png").exists()


# ---- convert / export

def test_export_refuses_a_shard_size_below_one_byte(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", str(model_dir), str(tmp_path / "hf"), "--max-shard-bytes", "-5"])
    assert "argument --max-shard-bytes: expected a positive integer, got '-5'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive number of bytes, got 0"):
        export_checkpoint(model_dir, tmp_path / "hf", max_shard_bytes=0, progress=False)


@pytest.mark.parametrize("where", ["file.txt/out", "/sys/out"])
def test_convert_and_export_into_an_unwritable_path(model_dir, tmp_path, where):
    (tmp_path / "file.txt").write_text("")
    fails("convert", MODEL_DIR, tmp_path / where, match="convert's output")
    fails("export", model_dir, tmp_path / where, match="export's output")


def test_outputs_honour_the_umask(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        export_checkpoint(model_dir, tmp_path / "hf", progress=False)
        convert_checkpoint(tmp_path / "hf", tmp_path / "ours", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ours").stat().st_mode & 0o777 == 0o755


def test_sigterm_inside_atomic_dir_leaves_nothing(tmp_path):
    """The CLI turns SIGTERM into KeyboardInterrupt, so an interrupted convert/export removes its temporary
    directory (by default SIGTERM ends Python without unwinding, and the hidden .NAME.tmp-* stayed)."""
    script = ("import os, signal, sys, time\n"
              "from svdprune_jax.cli import runtime\n"
              "from svdprune_jax.convert import atomic_dir\n"
              "runtime.catch_signals()\n"
              "try:\n"
              f"    with atomic_dir({str(tmp_path / 'out')!r}) as tmp:\n"
              "        (tmp / 'half').write_text('x')\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(5)\n"
              "except KeyboardInterrupt:\n"
              "    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert list(tmp_path.iterdir()) == []


# ---- eval

@pytest.mark.parametrize("template", ["USER: <image>\n{question} {foo}", "USER: <image>\n{question} {0}",
                                      "USER: <image>\n{question} {"])
def test_eval_prompt_template_with_other_fields(tmp_path, template, no_work):
    (tmp_path / "images").mkdir()
    (tmp_path / "testdev_balanced_questions.json").write_text("{}")
    fails("eval", "gqa", "--data", tmp_path, "--model", MODEL_DIR, "--prompt-template", template,
          match="the prompt template may hold no field but {question}")


@pytest.mark.parametrize("budget", ["inf%", "nan%", "0%", "-50%", "0/576", "-64/576"])
def test_eval_synthetic_budget_shares_outside_0_100(model_dir, tmp_path, budget):
    fails("eval", "synthetic", "--model", model_dir, "--n", "2", f"--budgets={budget}", "--out", tmp_path / "s",
          match="a share must be above 0 and at most 100%")


@pytest.mark.parametrize("where", ["file.txt/s", "/sys/s"])
def test_eval_synthetic_refuses_an_unwritable_out_before_the_work(tmp_path, no_work, where):
    (tmp_path / "file.txt").write_text("")
    fails("eval", "synthetic", "--n", "2", "--out", tmp_path / where, match="--out")


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1, 0.3])
def test_sigint_during_convert_one_line_and_nothing_left(tmp_path, delay):
    """Ctrl-C while `convert` writes (Orbax's writer threads went on into the directory being removed, and
    died with 'cannot schedule new futures' tracebacks): no traceback, and either nothing left with one line
    saying it was interrupted, or, when the signal came after the rename, the whole checkpoint. The signal is
    sent once the temporary output exists, after `delay` seconds."""
    import signal
    import time

    out = tmp_path / "ours"
    proc = subprocess.Popen([sys.executable, "-m", "svdprune_jax.cli.main", "convert", str(MODEL_DIR), str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".ours.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    left = sorted(p.name for p in tmp_path.iterdir())
    if left == ["ours"]:  # the signal came after the rename: the checkpoint is whole
        assert Pipeline.load(out).num_image_tokens == 196
    else:
        assert left == [], left
        assert proc.returncode != 0 and err.strip().splitlines()[-1] == "svdprune-jax convert: interrupted", err
