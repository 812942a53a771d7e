"""The distribution as a user gets it: a wheel with one import name, installed (not editable) in a fresh venv,
running the main job from outside the checkout; every sub-command's --help."""
import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from svdprune_jax.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True)
    (whl,) = out.glob("svdprune_jax-*.whl")
    return whl


def test_wheel_has_one_import_name_and_the_bundled_assets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"svdprune_jax"}
    for asset in ("example.png", "example.json", "model/model.safetensors", "model/config.json",
                  "model/tokenizer.json", "model/preprocessor_config.json"):
        assert f"svdprune_jax/synthetic/assets/{asset}" in names


def test_installed_wheel_runs_the_main_job_outside_the_checkout(wheel, tmp_path):
    """A fresh venv holding only the wheel; its dependencies come from this interpreter's site-packages through
    a path file (which runs none of the path files there, so the editable install of this checkout stays out)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SVDPRUNE_JAX_CACHE"] = str(tmp_path / "xla")
    code = "from svdprune_jax.cli.main import main; main()"
    where = subprocess.run([str(python), "-c", "import svdprune_jax; print(svdprune_jax.__file__)"], cwd=work,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert str(site) in where and str(ROOT) not in where
    done = subprocess.run([str(python), "-c", code, "run", "--json", "--max-new-tokens", "3"], cwd=work, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["keep"] == len(out["kept_indices"]) and (work / out["overlay"]).is_file()
    assert "PyTorch was not found" not in done.stderr


@pytest.mark.parametrize("argv", [[], ["run"], ["convert"], ["export"], ["eval"], ["eval", "synthetic"],
                                  ["eval", "gqa"], ["eval", "textvqa"], ["eval", "pope"], ["bench"], ["train"]])
def test_every_help_works(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: svdprune-jax {' '.join(argv)}".rstrip())
