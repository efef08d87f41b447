"""Failures as users meet them, on the CPU demo set-up (tiny Qwen3-MoE, EP=2, ``torchrun --nproc_per_node=2``).

One run anchors most of it: it saves after every step and one of its ranks is SIGKILLed in the middle of step 3.
Nothing of it may be left running 30 s later (megatron's checkpoint-writer Manager included); its checkpoints
are then damaged in the three ways the issue names, and ``trainer.resume=auto`` must pass over the damaged one
with one warning line and go on exactly as the killed run did. A full disk, a killed rollout server and bad data
each get a run of their own and must end in one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from test_trainer import DIGIT_SHARE_REWARD, NONDETERMINISTIC_PREFIXES, RECIPE, _env
from torchrun import free_port

from megatron_sapo.checkpoint import checkpoint_problem, resume_candidates, step_dir

MARK = "MEGATRON_SAPO_FAULT_TEST"  # in the environment of everything a test run starts, to find what is left
# The engine's own log-probs are float noise apart from the trainer's (~1e-7): absolute tolerance covers them.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def inputs(tiny_hf_dir, tmp_path_factory):
    from megatron_sapo.data.arithmetic import write_arithmetic_jsonl

    folder = tmp_path_factory.mktemp("fault_inputs")
    (folder / "digit_share.py").write_text(DIGIT_SHARE_REWARD)
    train_file = write_arithmetic_jsonl(str(folder / "train.jsonl"), num=16, max_operand=5)
    return {"hf_dir": tiny_hf_dir, "train_file": train_file, "reward": f"{folder / 'digit_share.py'}:digit_share"}


def _overrides(inputs: dict, out: str, *extra: str) -> list[str]:
    return [
        f"model.path={inputs['hf_dir']}", "model.mcore_checkpoint=null", f"data.train_files=[{inputs['train_file']}]",
        "reward.type=custom", f"reward.custom_function={inputs['reward']}", f"trainer.output_dir={out}",
        "trainer.total_steps=4", "trainer.save_freq=1", "trainer.max_checkpoints_to_keep=3",
        "trainer.export_hf_at_end=false", "trainer.tensorboard=false", "data.train_batch_size=4", "rollout.n=4",
        "actor.ppo_mini_batch_size=2", "reward.num_workers=1", "actor.megatron.expert_model_parallel_size=2", *extra,
    ]  # fmt: skip


class Run:
    """A trainer under torchrun in a session of its own, its output in files, its processes marked."""

    def __init__(self, overrides: list[str], log_dir: str):
        self.marker = uuid.uuid4().hex
        os.makedirs(log_dir, exist_ok=True)
        self.stdout_path, self.stderr_path = os.path.join(log_dir, "stdout"), os.path.join(log_dir, "stderr")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", "-m", "megatron_sapo.train", "--config", RECIPE,
                   *overrides]  # fmt: skip
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env={**_env(), MARK: self.marker},
                                         start_new_session=True)  # fmt: skip

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid, _ in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process carrying this run's marker."""
        found = []
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if f"{MARK}={self.marker}".encode() not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    found.append((int(name), f.read().replace(b"\0", b" ").decode(errors="replace").strip()))
            except (OSError, ValueError):
                continue
        return found

    def find(self, fragment: str, rank: str | None = None) -> int:
        for pid, cmdline in self.processes():
            if fragment in cmdline and (rank is None or _environ(pid).get("RANK") == rank):
                return pid
        raise AssertionError(f"no process {fragment!r} (rank {rank}) in {self.processes()}")

    def wait_for_step(self, out: str, step: int, timeout: float = 600) -> None:
        path = os.path.join(out, "metrics.jsonl")
        deadline = time.monotonic() + timeout
        while not (os.path.exists(path) and max(_metrics_in(path), default=0) >= step):
            assert self.proc.poll() is None, f"the run ended before step {step}\n{self.stderr[-6000:]}"
            assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
            time.sleep(0.05)


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    except OSError:
        return {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _rank_tracebacks(text: str) -> list[str]:
    """Tracebacks of the ranks (torchrun prefixes their lines with ``[rankN]:``); torchrun's own is expected."""
    return [line for line in text.splitlines() if line.startswith("[rank") and "]: Traceback" in line]


def _metrics_in(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, f))}


def _metrics(out: str) -> dict[int, dict]:
    return _metrics_in(os.path.join(out, "metrics.jsonl"))


# --- a rank SIGKILLed mid-step ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_run(inputs, tmp_path_factory):
    """A checkpoint after every step; rank 1 is SIGKILLed during step 3. Records what was left."""
    root = tmp_path_factory.mktemp("killed")
    out = str(root / "run")
    run = Run(_overrides(inputs, out), str(root / "logs"))
    try:
        run.wait_for_step(out, 2)
        before = run.processes()
        os.kill(run.find("megatron_sapo.train", rank="1"), signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 30
        while (run.proc.poll() is None or run.processes()) and time.monotonic() < deadline:
            time.sleep(0.25)
        left = run.processes()
        exit_code = run.proc.poll()
    finally:
        run.kill()
    metrics = _metrics(out)
    pristine = str(root / "pristine_checkpoints")
    shutil.copytree(os.path.join(out, "checkpoints"), pristine)
    return {"out": out, "before": before, "left": left, "exit_code": exit_code, "metrics": metrics,
            "pristine": pristine, "stderr": run.stderr}  # fmt: skip


def test_sigkill_of_one_rank_leaves_nothing_running(killed_run):
    # The check means something: megatron's writer Manager (a spawned multiprocessing process) was up.
    assert any("multiprocessing" in cmdline for _, cmdline in killed_run["before"]), killed_run["before"]
    assert killed_run["left"] == [], f"still running 30 s after the kill: {killed_run['left']}"
    assert killed_run["exit_code"] not in (None, 0)
    # On disk: the last published checkpoint is complete, nothing half-written is left.
    checkpoints = os.path.join(killed_run["out"], "checkpoints")
    assert open(os.path.join(checkpoints, "latest")).read().strip() == "iter_0000002"
    assert checkpoint_problem(step_dir(checkpoints, 2), required=("trainer_state.json",)) is None
    assert not [name for name in os.listdir(checkpoints) if name.endswith((".tmp", ".old"))]
    # Every file's content is on record (both ranks' shards among them), not only its size.
    manifest = json.load(open(os.path.join(step_dir(checkpoints, 2), "manifest.json")))
    assert manifest["checksum"] == "xxh3_64" and sorted(manifest["checksums"]) == sorted(manifest["files"])
    assert {"__0_0.distcp", "__1_0.distcp", "trainer_state.json"} <= set(manifest["checksums"])


def _shard(ckpt_dir: str) -> str:
    return sorted(name for name in os.listdir(ckpt_dir) if name.endswith(".distcp"))[-1]


def _flip_middle_byte(path: str) -> None:
    """One bit of the byte in the middle of the file inverted: same size, damaged content."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


DAMAGES = {
    "flipped_byte_in_shard": lambda ckpt: _flip_middle_byte(os.path.join(ckpt, _shard(ckpt))),
    "truncated_shard": lambda ckpt: os.truncate(os.path.join(ckpt, _shard(ckpt)), 1000),
    "deleted_shard": lambda ckpt: os.remove(os.path.join(ckpt, _shard(ckpt))),
    "deleted_trainer_state": lambda ckpt: os.remove(os.path.join(ckpt, "trainer_state.json")),
}
EXPECTED_PROBLEM = {"flipped_byte_in_shard": "damaged (its xxh3_64 checksum is",
                    "truncated_shard": "truncated (1000 of", "deleted_shard": "lacks __", "deleted_trainer_state":
                    "lacks trainer_state.json"}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_passed_over(damage, killed_run, tmp_path):
    checkpoints = str(tmp_path / "checkpoints")
    shutil.copytree(killed_run["pristine"], checkpoints)
    assert resume_candidates(checkpoints) == (step_dir(checkpoints, 2), [])
    DAMAGES[damage](step_dir(checkpoints, 2))
    chosen, skipped = resume_candidates(checkpoints)
    assert chosen == step_dir(checkpoints, 1)
    assert len(skipped) == 1 and skipped[0].startswith("iter_0000002 ") and EXPECTED_PROBLEM[damage] in skipped[0]


def test_resume_auto_falls_back_with_one_warning_and_continues_exactly(killed_run, inputs, tmp_path):
    """iter_2 has one byte flipped in the middle of a shard (right size, wrong content): the resumed run starts from
    iter_1, says so once, and redoes step 2 exactly."""
    out = killed_run["out"]
    DAMAGES["flipped_byte_in_shard"](step_dir(os.path.join(out, "checkpoints"), 2))
    run = Run(_overrides(inputs, out, "trainer.total_steps=2"), str(tmp_path / "logs"))
    assert run.wait() == 0, run.stderr[-6000:]
    warnings = [line for line in run.stderr.splitlines() if "passed over" in line]
    assert len(warnings) == 1 and "iter_0000002 has __" in warnings[0], warnings
    assert "damaged" in warnings[0] and "resuming from" in warnings[0], warnings
    resumed, original = _metrics(out), killed_run["metrics"]
    assert sorted(resumed) == [1, 2]
    for key, value in original[2].items():
        if not key.startswith(NONDETERMINISTIC_PREFIXES):
            assert resumed[2][key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), key
    assert checkpoint_problem(step_dir(os.path.join(out, "checkpoints"), 2), required=("trainer_state.json",)) is None


def test_named_damaged_checkpoint_is_one_error_line(killed_run, inputs, tmp_path):
    checkpoints = str(tmp_path / "checkpoints")
    shutil.copytree(killed_run["pristine"], checkpoints)
    damaged = step_dir(checkpoints, 2)
    DAMAGES["flipped_byte_in_shard"](damaged)
    out = str(tmp_path / "run")
    run = Run(_overrides(inputs, out, f"trainer.resume={damaged}"), str(tmp_path / "logs"))
    assert run.wait() != 0
    errors = _error_lines(run.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: trainer.resume={damaged}: the checkpoint has __"), errors
    assert "damaged (its xxh3_64 checksum is" in errors[0]
    assert not _rank_tracebacks(run.stderr)
    assert "exitcode  : 2" in run.stderr


# --- a full disk during a save ------------------------------------------------------------------------------------


def test_disk_full_during_save_is_one_line_and_keeps_latest(inputs, tmp_path):
    """The checkpoints folder is a 64 MiB tmpfs; as the step-2 save starts, a file takes all but 1 MiB of it."""
    out = str(tmp_path / "run")
    checkpoints = os.path.join(out, "checkpoints")
    os.makedirs(checkpoints)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", checkpoints], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        run = Run(_overrides(inputs, out), str(tmp_path / "logs"))
        partial = step_dir(checkpoints, 2) + ".tmp"
        try:
            while not os.path.isdir(partial):
                assert run.proc.poll() is None, f"the run ended before its step-2 save\n{run.stderr[-6000:]}"
                time.sleep(0.002)
            _fill(checkpoints, leave=2**20)
            exit_code = run.wait(timeout=300)
        finally:
            run.kill()
        errors = _error_lines(run.stderr)
        assert exit_code != 0 and len(errors) == 1, run.stderr[-6000:]
        assert errors[0].startswith(f"error: saving checkpoint {step_dir(checkpoints, 2)} failed: the disk is full (")
        assert "the checkpoint needs about" in errors[0] and "the checkpoints before it are intact" in errors[0]
        assert "exitcode  : 1" in run.stderr
        assert not _rank_tracebacks(run.stderr)
        assert sorted(os.listdir(checkpoints)) == ["filler", "iter_0000001", "latest"]
        assert checkpoint_problem(step_dir(checkpoints, 1), required=("trainer_state.json",)) is None
    finally:
        subprocess.run(["umount", "-l", checkpoints], capture_output=True)


def _fill(folder: str, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system, while the save writes to it too."""
    with open(os.path.join(folder, "filler"), "wb") as f:
        for _ in range(50):
            stat = os.statvfs(folder)
            size = stat.f_bavail * stat.f_frsize - leave
            if size <= 0:
                return
            try:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, size)
                return
            except OSError:  # the save took some of it meanwhile
                continue


def test_too_little_space_is_found_before_writing(tmp_path):
    """The free-space check before a save (no process group: a world of one), on a 1 MiB tmpfs."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_sapo.checkpoint import save_sharded
    from megatron_sapo.errors import RunError

    folder = str(tmp_path / "small")
    os.makedirs(folder)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2**19))}  # 2 MiB of float32
        with pytest.raises(RunError) as error:
            save_sharded(state, os.path.join(folder, "iter_0000001"))
        message = str(error.value)
        assert "the disk is full (" in message and "the checkpoint needs about 2.1 MiB" in message
        assert "nothing was written" in message and "\n" not in message
        assert os.listdir(folder) == []
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True)


# --- a dead rollout server ----------------------------------------------------------------------------------------


def test_killed_rollout_server_ends_the_run_with_one_line(inputs, tmp_path):
    out = str(tmp_path / "run")
    run = Run(_overrides(inputs, out, "trainer.save_freq=0"), str(tmp_path / "logs"))
    try:
        run.wait_for_step(out, 1)
        server = run.find("megatron_sapo.rollout.server")
        os.kill(server, signal.SIGKILL)
        killed_at = time.monotonic()
        exit_code = run.wait(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        run.kill()
    stderr = run.stderr
    assert exit_code != 0 and took < 30, f"{took:.1f}s\n{stderr[-6000:]}"
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr[-6000:]
    log = os.path.join(out, "rollout_logs", "embedded.log")
    assert f"(pid {server}) was killed by SIGKILL (exit code -9); its log is {log}" in errors[0]
    assert len([line for line in stderr.splitlines() if "attempt" in line]) < 10
    assert not _rank_tracebacks(stderr)
    assert "exitcode  : 1" in stderr


# --- bad data -----------------------------------------------------------------------------------------------------


def test_data_errors_name_file_and_line(inputs, tmp_path):
    from megatron_sapo.config import load_config
    from megatron_sapo.data import load_prompts, load_tokenizer
    from megatron_sapo.errors import InputError

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "1+1=", "label": "2"}\n{"prompt": "caf\xe9", "label": "1"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    tokenizer = load_tokenizer(inputs["hf_dir"])
    for path, expected in [(latin1, f"{latin1}:2: not UTF-8 text (byte 0xe9 at column 16)"),
                           (empty, f"data.train_files: {empty} is empty (no rows)")]:  # fmt: skip
        overrides = _overrides({**inputs, "train_file": str(path)}, str(tmp_path / "run"))
        config = load_config(RECIPE, overrides, world_size=2)
        with pytest.raises(InputError) as error:
            load_prompts(config.data, tokenizer)
        assert str(error.value).startswith(expected), str(error.value)


def test_bad_data_under_torchrun_stops_before_start_up(inputs, tmp_path):
    """Rank 0 reads the data before any process group exists; the other rank waits for its verdict."""
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9", "label": "1"}\n')
    out = str(tmp_path / "run")
    run = Run(_overrides({**inputs, "train_file": str(latin1)}, out), str(tmp_path / "logs"))
    assert run.wait(timeout=120) != 0
    assert _error_lines(run.stderr) == [f"error: {latin1}:1: not UTF-8 text (byte 0xe9 at column 16) — re-encode "
                                        "the file as UTF-8"]  # fmt: skip
    assert "exitcode  : 2" in run.stderr and not _rank_tracebacks(run.stderr)
    assert not os.path.exists(out)  # train() never started: it writes the resolved config first
