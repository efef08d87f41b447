"""What keeps the rollout servers' API key secret (megatron_sapo/rollout/auth.py, rollout/sglang_entry.py): the
launcher's entry file gives SGLang the key without a command line showing it and masks it in everything SGLang and
its children print; the saved config never holds it. Refusals themselves are tested where the servers run
(test_rollout_weights.py, test_rollout_sglang.py) and held to SGLang's source in test_sglang_conformance.py."""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_sapo.rollout.auth import API_KEY_ENV, new_api_key, run_api_key
from megatron_sapo.rollout.sglang import SGLANG_ENTRY

# A stand-in for sglang.launch_server that prints the key every way a log line can: whole, split over two writes,
# in a child process, inside a long stretch without a line break, and last without a trailing newline.
FAKE_LAUNCH_SERVER = r"""
import os, subprocess, sys
key = sys.argv[sys.argv.index("--api-key") + 1]
assert os.environ.get("MEGATRON_SAPO_ROLLOUT_API_KEY") is None
print(f"server_args=ServerArgs(api_key={key!r})", flush=True)
half = len(key) // 2
os.write(1, b"split: " + key[:half].encode()); os.write(1, key[half:].encode() + b"\n")
subprocess.run([sys.executable, "-c", f"import sys; sys.stderr.write('child: {key}\\n')"])
os.write(2, b"x" * 100_000 + key.encode() + b"y" * 100 + b"\n")
sys.stdout.write("last: " + key)
"""


def test_the_entry_file_hands_sglang_the_key_and_masks_it_in_every_output(tmp_path):
    site = tmp_path / "site"
    (site / "sglang").mkdir(parents=True)
    (site / "sglang" / "__init__.py").write_text("")
    (site / "sglang" / "launch_server.py").write_text(FAKE_LAUNCH_SERVER)
    key = new_api_key()
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=str(site), **{API_KEY_ENV: key})
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, SGLANG_ENTRY, "--model-path", "/m"], stdout=out,
                              stderr=subprocess.STDOUT, env=env, timeout=60)  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert key not in text and key[: len(key) // 2] not in text
    assert "server_args=ServerArgs(api_key='***')" in text and "split: ***\n" in text and "child: ***\n" in text
    assert "x" * 100_000 + "***" + "y" * 100 + "\n" in text and text.endswith("last: ***")


def test_without_a_key_the_entry_file_is_launch_server_as_is(tmp_path):
    site = tmp_path / "site"
    (site / "sglang").mkdir(parents=True)
    (site / "sglang" / "__init__.py").write_text("")
    (site / "sglang" / "launch_server.py").write_text("import sys; print(sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV} | {"PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, SGLANG_ENTRY, "--port", "1"], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "['--port', '1']", proc.stderr


def test_the_runs_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    fresh = {run_api_key(None, launched=True) for _ in range(3)}
    assert len(fresh) == 3 and all(len(k) >= 40 for k in fresh)  # 32 random bytes, URL-safe
    assert run_api_key(None, launched=False) is None  # an external server without a key
    assert run_api_key("configured", launched=True) == "configured"
    monkeypatch.setenv(API_KEY_ENV, "from-env")  # for external servers; launched ones never reuse it
    assert run_api_key(None, launched=False) == "from-env" and run_api_key("configured", launched=False) == "configured"
    assert run_api_key(None, launched=True) not in ("from-env", None)


def test_the_saved_config_never_holds_the_key(tmp_path):
    from megatron_sapo.config import Config, save_resolved_config

    config = Config()
    config.rollout.api_key = "a-secret-key-value"
    path = save_resolved_config(config, str(tmp_path))
    text = open(path).read()
    assert "a-secret-key-value" not in text and "api_key: null" in text
    assert config.rollout.api_key == "a-secret-key-value"  # the run itself still has it
