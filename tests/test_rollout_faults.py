"""A killed, hanging, flaky or refusing server: bounded retries, then one clear error, never a hang past the
configured timeouts."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
import torch
from test_rollout_sglang import StubServer, sglang_reply

from megatron_sapo.errors import InputError
from megatron_sapo.rollout import RolloutConfig, RolloutEngine, RolloutError, SamplingParams
from megatron_sapo.rollout.client import EventLoopThread, RolloutClient, RolloutServerDown
from megatron_sapo.rollout.weight_sync import DistributedWeightSync

ONE_TOKEN = SamplingParams(max_new_tokens=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HangingServer:
    """Accepts connections on 127.0.0.1 and never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self):
        self.socket.close()
        for connection in self.held:
            connection.close()


def generate(client: RolloutClient, prompts, n=1, sampling=ONE_TOKEN):
    async def go():
        try:
            return await client.generate_groups(prompts, n, sampling, seed=1)
        finally:
            await client.close()

    return asyncio.new_event_loop().run_until_complete(go())


def test_a_killed_server_is_one_error_naming_it_without_retries(tiny_hf_dir):
    config = RolloutConfig(backend="embedded", max_new_tokens=400, max_retries=2, retry_backoff_s=0.2,
                           request_timeout_s=30)  # fmt: skip
    engine = RolloutEngine(config, model_path=tiny_hf_dir, eos_token_id=5)
    try:
        assert len(engine.generate([[1, 2, 3]], n=2, max_new_tokens=2)[0]) == 2
        # Killed in the middle of a long batch: the requests in flight break, the retries find nobody.
        long = engine.sampling_params(ignore_eos=True, stop_token_ids=())
        pending = engine._loop.submit(engine.client.generate_groups([[1, 2, 3]] * 48, 1, long, seed=3))
        time.sleep(1.0)
        assert not pending.done()
        killed_at = time.monotonic()
        engine.processes[0].process.kill()
        with pytest.raises(RolloutServerDown) as error:
            pending.result(timeout=30)
        assert time.monotonic() - killed_at < 5  # no retries once the server is known dead, not the 30 s timeout
        message = str(error.value)
        pid, log = engine.processes[0].process.pid, engine.processes[0].log_path
        assert message == f"rollout server {engine.urls[0]} (pid {pid}) was killed by SIGKILL (exit code -9); its " \
                          f"log is {log}"  # fmt: skip
        # And afterwards every call fails the same way, promptly.
        start = time.monotonic()
        with pytest.raises(RolloutServerDown, match="was killed by SIGKILL"):
            engine.generate([[1, 2]], n=1)
        assert time.monotonic() - start < 3
    finally:
        engine.shutdown()


def test_a_hanging_server_times_out_on_every_attempt():
    hanging = HangingServer()
    client = RolloutClient([hanging.url], request_timeout_s=0.5, max_retries=2, retry_backoff_s=0.1)
    start = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"failed after 3 attempt\(s\) on .*: no reply within 0.5s"):
            generate(client, [[1, 2, 3]])
    finally:
        hanging.close()
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 3.5, elapsed  # three 0.5 s attempts and 0.3 s of backoff


def test_a_flaky_server_is_retried_until_it_answers():
    reply = sglang_reply([4, 5], [-1.0, -2.0])
    stub = StubServer(lambda path, body, count: (503, "busy") if count <= 2 else (200, reply))
    client = RolloutClient([stub.url], max_retries=3, retry_backoff_s=0.05)
    try:
        ((sample,),) = generate(client, [[1, 2, 3]])
    finally:
        stub.close()
    assert sample.response_ids == [4, 5] and sample.logprobs == [-1.0, -2.0]
    assert len(stub.requests) == 3


def test_aborted_requests_are_retried_then_reported():
    abort = {"type": "abort", "message": "Abort before prefill"}
    stub = StubServer(lambda path, body, count: (200, sglang_reply([], [], abort)))
    client = RolloutClient([stub.url], max_retries=1, retry_backoff_s=0.01)
    try:
        with pytest.raises(RolloutError, match=r"failed after 2 attempt\(s\).*aborted the request: Abort before "
                                               r"prefill"):  # fmt: skip
            generate(client, [[1]])
    finally:
        stub.close()
    assert len(stub.requests) == 2


def test_a_dead_server_is_skipped_for_the_next_one():
    stub = StubServer(lambda path, body, count: (200, sglang_reply([9], [-0.5])))
    dead = f"http://127.0.0.1:{free_port()}"
    client = RolloutClient([dead, stub.url], max_retries=1, retry_backoff_s=0.01)
    try:
        groups = generate(client, [[1], [2], [3], [4]])
    finally:
        stub.close()
    assert [[s.response_ids for s in g] for g in groups] == [[[9]]] * 4
    assert len(stub.requests) == 4  # every request landed there, first try or second


def test_one_failed_request_fails_the_whole_call_with_one_error():
    def respond(path, body, count):
        if 13 in body["input_ids"]:
            return 400, {"object": "error", "message": "The input is too long", "code": 400}
        time.sleep(0.05)
        return 200, sglang_reply([7], [-1.0])

    stub = StubServer(respond)
    client = RolloutClient([stub.url], max_retries=3, retry_backoff_s=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"HTTP 400: The input is too long") as error:
            generate(client, [[1], [13], [2]], n=4)
    finally:
        stub.close()
    assert type(error.value) is RolloutError and time.monotonic() - start < 1.0


def test_a_server_refusing_to_join_the_weight_group_fails_the_sync_at_once():
    stub = StubServer(lambda path, body, count: (400, {"success": False, "message": "no GPU here"}))
    loop = EventLoopThread()
    client = RolloutClient([stub.url])
    sync = DistributedWeightSync(client, loop, [stub.url], [1], backend="gloo", timeout_s=8)
    start = time.monotonic()
    try:
        with pytest.raises(RolloutError, match=r"weight-update group did not form \(2 ranks at 127.0.0.1:\d+\): .*no "
                                               r"GPU here"):  # fmt: skip
            sync.connect()
    finally:
        loop.run(client.close())
        loop.close()
        stub.close()
    assert time.monotonic() - start < 3  # not the 8 s rendezvous timeout


def test_a_failed_sync_still_drains_the_trainers_tensors():
    """Producing the tensors is collective on the trainer; a failed sync must not leave the other ranks waiting."""

    def respond(path, body, count):
        if path == "/server_info":
            return 200, {"tp_size": 1, "dp_size": 1, "device": "cpu"}
        if path == "/init_weights_update_group":
            return 400, {"success": False, "message": "Failed to initialize custom process group"}
        return 200, "ok"

    stub = StubServer(respond)
    produced = []

    def tensors():
        for i in range(5):
            produced.append(i)
            yield f"w{i}", torch.zeros(4)

    config = RolloutConfig(backend="external", urls=[stub.url], weight_sync="distributed", weight_sync_timeout_s=8)
    try:
        with RolloutEngine(config, model_path="unused") as engine:
            assert engine.ranks_per_server == [1]
            with pytest.raises(RolloutError, match="Failed to initialize custom process group"):
                engine.update_weights(tensors())
    finally:
        stub.close()
    assert produced == [0, 1, 2, 3, 4]


def test_bad_model_path_and_unreachable_urls_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"model.path=.*nowhere: no config.json there"):
        RolloutEngine(RolloutConfig(backend="embedded"), model_path=str(tmp_path / "nowhere"))
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match=rf"rollout.urls: {url} is not reachable \(ConnectionRefused.*\); start the "
                                         "server or fix the URL"):  # fmt: skip
        RolloutEngine(RolloutConfig(backend="external", urls=[url], weight_sync="disk"), model_path=str(tmp_path))


def test_an_embedded_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_model"}')
    start = time.monotonic()
    logs = tmp_path / "logs"
    with pytest.raises(RolloutError, match=r"(?s)exited with status 1 while starting.*no_such_model"):
        RolloutEngine(RolloutConfig(backend="embedded", startup_timeout_s=120), model_path=str(tmp_path),
                      log_dir=str(logs))  # fmt: skip
    assert "no_such_model" in (logs / "embedded.log").read_text()  # kept for a look
    assert time.monotonic() - start < 60


def test_an_external_server_killed_during_a_distributed_sync_is_one_line_naming_it(tiny_hf_dir, caplog):
    """The server is SIGKILLed while the trainer side broadcasts a bucket over the gloo group: the sync ends in one
    RolloutError naming the server (not gloo's "Connection reset by peer"), with no further warnings."""
    import os
    import signal

    from megatron_sapo.rollout.hf_weights import iter_safetensors

    server = RolloutEngine(RolloutConfig(backend="embedded"), model_path=tiny_hf_dir)
    try:
        config = RolloutConfig(backend="external", urls=server.urls, api_key=server.api_key, weight_sync="distributed",
                               bucket_size_mb=0.05, weight_sync_timeout_s=60)  # fmt: skip
        with RolloutEngine(config, model_path=tiny_hf_dir) as trainer_side:
            def tensors():
                for index, named in enumerate(iter_safetensors(tiny_hf_dir)):
                    if index == 20:  # a few buckets in
                        os.kill(server.processes[0].process.pid, signal.SIGKILL)
                    yield named

            caplog.clear()
            with pytest.raises(RolloutError) as failed:
                trainer_side.update_weights(tensors())
    finally:
        server.shutdown()
    message = str(failed.value)
    assert message.startswith("broadcasting weights to the rollout servers failed: rollout server "
                              f"{server.urls[0]} does not answer its health check"), message  # fmt: skip
    assert "\n" not in message and "gloo" not in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
