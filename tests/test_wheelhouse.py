"""`make wheelhouse` fits a device call, and `make gpu-smoke`'s install step works offline on the device image.

The lent device machine (Python 3.12, torch with CUDA, no network) takes at most 64 MiB with the working tree. Here the
device image is simulated on the CPU: a fresh Python 3.12 venv that sees only the packages the image has
(``bench/gpu_smoke.py``: DEVICE_IMAGE_PACKAGES, taken from this leg's venv, torch included), then gpu-smoke's own
install commands from the Makefile (``pip install --no-index`` from the wheel folder, the package with
``--no-build-isolation``), then the package's entry points. Runs in the Python 3.12 leg (`make test-mcore019`),
whose venv has the cp312 wheels' versions.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_MIB = 60

pytestmark = [
    pytest.mark.mcore019,
    pytest.mark.skipif(sys.version_info < (3, 12), reason="the Python 3.12 leg's check (make test-mcore019)"),
]


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _image_site(site: str) -> list[str]:
    """Symlink into ``site`` every installed distribution the device image also has (files and metadata)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from gpu_smoke import DEVICE_IMAGE_PACKAGES

    linked = []
    for dist in importlib.metadata.distributions():
        if _normalised(dist.metadata["Name"]) not in DEVICE_IMAGE_PACKAGES:
            continue
        root = str(dist.locate_file(""))
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source, target = os.path.join(root, top), os.path.join(site, top)
            if os.path.exists(source) and not os.path.lexists(target):
                os.symlink(source, target)
        linked.append(_normalised(dist.metadata["Name"]))
    return linked


def test_wheelhouse_fits_a_device_call_and_installs_offline_on_the_device_image(tmp_path):
    wheels = tmp_path / "wheels"
    made = subprocess.run(["make", "-s", "wheelhouse", f"WHEELS={wheels}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "wheelhouse: " in made.stdout
    names = sorted(os.listdir(wheels))
    size = sum(os.path.getsize(wheels / n) for n in names)
    assert size <= LIMIT_MIB << 20, f"{size / 2**20:.1f} MiB of wheels: {names}"
    wanted = (wheels / "requirements.txt").read_text().split()
    assert any(line.startswith("megatron-core==0.19.") for line in wanted), wanted
    # nothing the image already has is carried: torch, numpy, pyarrow, transformers stay the image's
    assert not [line for line in wanted if line.split("==")[0] in ("torch", "numpy", "pyarrow", "transformers")]

    site = tmp_path / "image-site"
    site.mkdir()
    linked = _image_site(str(site))
    assert {"torch", "numpy", "transformers", "pyarrow", "safetensors"} <= set(linked)
    venv = tmp_path / "device"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    with open(os.path.join(purelib, "device-image.pth"), "w") as f:
        f.write(str(site) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1")
    for step in (  # gpu-smoke's install commands (Makefile), offline
        ["-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--no-deps", "-r",
         str(wheels / "requirements.txt")],
        ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--use-pep517", "-e", REPO],
    ):  # fmt: skip
        proc = subprocess.run([py, *step], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = (
        "import megatron.core, omegaconf, math_verify, megatron_sapo.trainer, megatron_sapo.convert.cli;"
        "from megatron_sapo.parallel.mcore_compat import mcore_version; print(mcore_version())"
    )
    proc = subprocess.run([py, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "(0, 19)", proc.stderr[-3000:]
    for entry in (["-m", "megatron_sapo.train", "--help"], [os.path.join(REPO, "bench", "gpu_smoke.py"), "--help"]):
        proc = subprocess.run([py, *entry], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]
