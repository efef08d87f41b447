"""tools/plot_metrics.py: a run's metrics.jsonl becomes a PNG grid; a missing or empty file is one error line."""

import importlib.util
import json
import os
import struct

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is a dev dependency (pip install -e '.[dev]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", os.path.join(ROOT, "tools", "plot_metrics.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_metrics(run_dir, steps=30):
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {
                "step": step,
                "reward/mean": 0.1 + 0.02 * step,
                "response_length/mean": 900.0 + 10 * step,
                "actor/entropy": 0.6 - 0.01 * step,
                "actor/grad_weight_mean": 0.95,
                "actor/grad_norm": 0.2 + 0.01 * (step % 5),
                "actor/pg_loss": -0.01 * step,
                "timing/rollout": 30.0,
                "timing/update": 12.0,
                "perf/tokens_per_s": 4000.0 + step,
            }
            if step > 3:  # a key that appears late (and actor/approx_kl, rollout/logprob_diff never do)
                record["rollout/logprob_diff"] = 0.01
            f.write(json.dumps(record) + "\n")


def test_metrics_become_a_png(tmp_path, capsys):
    write_metrics(tmp_path)
    out = tmp_path / "plots" / "curves.png"
    assert load_tool().main([str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600  # a grid of panels, not an empty figure
    assert 20_000 < len(data) < 5_000_000


def test_default_output_is_next_to_the_metrics(tmp_path, capsys):
    write_metrics(tmp_path, steps=2)
    assert load_tool().main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
    assert capsys.readouterr().out.strip() == str(tmp_path / "metrics.png")


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "is empty"), ("{oops\n", "not a JSON")])
def test_missing_or_bad_metrics_exit_2_with_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert load_tool().main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: ") and message in captured.err
    assert not (tmp_path / "metrics.png").exists()
