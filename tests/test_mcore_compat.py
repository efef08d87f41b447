"""The megatron-core compatibility layer: which release reads which checkpoint, and the one line when it cannot."""

from __future__ import annotations

import json
import os

import pytest
from test_convert_cli import HF_TO_MCORE, MCORE_TO_HF, run

from megatron_sapo.checkpoint import file_checksums
from megatron_sapo.parallel.mcore_compat import at_least, mcore_version, unreadable_checkpoint

# metadata.json as each release writes it (read off checkpoints both wrote of the same tiny model)
METADATA_016 = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}  # fmt: skip
METADATA_019 = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


def _folder(tmp_path, name, metadata, common_pt):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps(metadata))
    if common_pt:
        (folder / "common.pt").write_bytes(b"")
    return str(folder)


def test_setup_py_pairs_the_interpreter_with_its_release():
    import sys

    assert mcore_version() == ((0, 19) if sys.version_info >= (3, 12) else (0, 16))


def test_which_release_reads_which_checkpoint(tmp_path):
    written_by_016 = _folder(tmp_path, "m016", METADATA_016, common_pt=True)
    written_by_019 = _folder(tmp_path, "m019", METADATA_019, common_pt=False)
    assert unreadable_checkpoint(written_by_016) is None  # 0.19 reads 0.16's checkpoints, and 0.16 its own
    if at_least(0, 17):
        assert unreadable_checkpoint(written_by_019) is None
    else:
        reason = unreadable_checkpoint(written_by_019)
        assert reason.startswith("was written by megatron-core 0.17 or later (no common.pt)")
        assert "megatron-core 0.16 cannot read" in reason and "Python 3.12" in reason
    assert unreadable_checkpoint(str(tmp_path / "missing")) is None  # checkpoint_problem's case, not this one


@pytest.mark.skipif(at_least(0, 17), reason="megatron-core 0.17+ reads both layouts")
def test_a_checkpoint_of_a_newer_release_is_one_line_under_016(tiny_hf_dir, tmp_path):
    """A 0.16 checkpoint turned into 0.19's file layout (no common.pt, no common_backend): 0.16 used to fail deep in
    its load_common with a traceback; now the export stops with one line before megatron reads anything."""
    mcore = tmp_path / "mcore"
    proc = run(HF_TO_MCORE, "--hf-dir", tiny_hf_dir, "--out", str(mcore))
    assert proc.returncode == 0, proc.stderr[-3000:]
    os.remove(mcore / "common.pt")
    (mcore / "metadata.json").write_text(json.dumps(METADATA_019))
    manifest = json.loads((mcore / "manifest.json").read_text())
    manifest["files"].pop("common.pt")
    manifest["files"]["metadata.json"] = os.path.getsize(mcore / "metadata.json")
    manifest["checksums"].pop("common.pt")
    manifest["checksums"] |= file_checksums(str(mcore), ["metadata.json"])  # as 0.19's save would have them
    (mcore / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "hf"
    proc = run(MCORE_TO_HF, "--mcore-dir", str(mcore), "--hf-template", tiny_hf_dir, "--out", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "was written by megatron-core 0.17 or later" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
