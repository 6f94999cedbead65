"""Rounds of coalesced requests (shim.backends.coalescing) and the Triton backend's call handling, without servers."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from fos_runtime.batching import plan_for
from fos_runtime.padding import bucket_length
from fos_runtime.spec import ModelSpec
from shim.backends.coalescing import Coalescer, in_order, pieces
from shim.backends.triton import TritonBackend, _Rows
from shim.errors import BackendFailed, BackendTimeout, BackendUnavailable


class Recorder:
    """A round runner that records each round and takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.05, fail: set[str] | None = None):
        self.delay = delay
        self.fail = fail or set()
        self.rounds: list[list[str]] = []
        self.finished: list[list[str]] = []

    async def __call__(self, payloads, wanted=None):
        self.wanted = wanted
        self.rounds.append(list(payloads))
        await asyncio.sleep(self.delay)
        self.finished.append(list(payloads))
        return [ValueError(p) if p in self.fail else p.upper() for p in payloads]


async def _with(coalescer: Coalescer, body):
    coalescer.start()
    try:
        return await body()
    finally:
        await coalescer.close()


async def test_requests_that_wait_share_one_round():
    run = Recorder()
    rounds = Coalescer(run, max_rows=100, max_cost=100, name="t")

    async def body():
        first = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
        await asyncio.sleep(0.01)  # "a" runs alone: nothing waited for it
        rest = [asyncio.create_task(rounds.submit(x, rows=1, cost=1)) for x in "bcdef"]
        return await asyncio.gather(first, *rest)

    assert await _with(rounds, body) == list("ABCDEF")
    assert run.rounds == [["a"], list("bcdef")]
    assert rounds.stats.rounds == 2 and rounds.stats.rows_per_round == 3.0


async def test_a_lone_request_is_not_delayed():
    run = Recorder(delay=0.0)
    rounds = Coalescer(run, max_rows=100, max_cost=100)

    async def body():
        loop = asyncio.get_running_loop()
        start = loop.time()
        await rounds.submit("x", rows=1, cost=1)
        return loop.time() - start

    assert await _with(rounds, body) < 0.05


async def test_rounds_are_cut_by_budget_and_a_large_request_still_runs():
    run = Recorder()
    rounds = Coalescer(run, max_rows=3, max_cost=10, name="t")

    async def body():
        blocker = asyncio.create_task(rounds.submit("z", rows=1, cost=1))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(rounds.submit(x, rows=1, cost=4)) for x in "abc"]
        waiting += [asyncio.create_task(rounds.submit("big", rows=50, cost=500))]
        waiting += [asyncio.create_task(rounds.submit(x, rows=1, cost=1)) for x in "de"]
        return await asyncio.gather(blocker, *waiting)

    await _with(rounds, body)
    assert run.rounds == [["z"], ["a", "b"], ["c"], ["big"], ["d", "e"]]


def test_a_request_larger_than_a_round_goes_in_pieces_of_like_lengths():
    assert pieces([5, 1, 9, 2, 3], 100) == [[1, 3, 4, 0, 2]]
    assert pieces([5, 1, 9, 2, 3], 6) == [[1, 3, 4], [0], [2]]  # 9 alone, past the budget
    groups = pieces([5, 1, 9, 2, 3], 6)
    parts = [np.array([[i * 10.0] for i in g]) for g in groups]
    assert in_order(groups, parts).ravel().tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]


async def test_a_small_request_is_answered_between_a_large_ones_pieces():
    # A request of 256 long inputs held every other (a single query, another model's too) for its whole 6 s (review).
    run = Recorder(delay=0.05)
    rounds = Coalescer(run, max_rows=100, max_cost=10, name="t")

    async def body():
        large = asyncio.create_task(rounds.submit_pieces([(f"p{k}", 1, 10) for k in range(4)]))
        await asyncio.sleep(0.01)  # p0 runs
        small = await rounds.submit("q", rows=1, cost=1)
        assert not large.done()
        return small, await large

    assert await _with(rounds, body) == ("Q", ["P0", "P1", "P2", "P3"])
    assert run.rounds[:2] == [["p0"], ["q"]]


async def test_a_failed_piece_fails_its_request_and_the_rest_is_not_run():
    run = Recorder(delay=0.02, fail={"p1"})
    rounds = Coalescer(run, max_rows=100, max_cost=10, concurrency=2)

    async def body():
        with pytest.raises(ValueError):
            await rounds.submit_pieces([(f"p{k}", 1, 10) for k in range(6)])
        await asyncio.sleep(0.1)

    await _with(rounds, body)
    assert run.rounds[:2] == [["p0"], ["p1"]] and len(run.rounds) <= 3  # two in flight at most, then it stops


async def test_pieces_of_a_request_that_left_are_not_run():
    run = Recorder(delay=0.05)
    rounds = Coalescer(run, max_rows=100, max_cost=10)

    async def body():
        large = asyncio.create_task(rounds.submit_pieces([(f"p{k}", 1, 10) for k in range(4)]))
        await asyncio.sleep(0.01)
        large.cancel()
        with pytest.raises(asyncio.CancelledError):
            await large
        assert run.finished == [["p0"]]  # it waited for the piece running to end, as submit does
        await asyncio.sleep(0.2)

    await _with(rounds, body)
    assert run.rounds == [["p0"]]


async def test_one_failure_fails_only_its_request():
    rounds = Coalescer(Recorder(fail={"b"}), max_rows=100, max_cost=100)

    async def body():
        await asyncio.sleep(0)
        return await asyncio.gather(*(rounds.submit(x, rows=1, cost=1) for x in "abc"), return_exceptions=True)

    a, b, c = await _with(rounds, body)
    assert (a, c) == ("A", "C") and isinstance(b, ValueError)


async def test_a_request_that_leaves_before_its_round_is_never_run_nor_held():
    run = Recorder(delay=0.1)
    rounds = Coalescer(run, max_rows=100, max_cost=100)

    async def body():
        first = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
        await asyncio.sleep(0.01)
        gone = [asyncio.create_task(rounds.submit(f"gone{i}", rows=1, cost=1)) for i in range(50)]
        kept = asyncio.create_task(rounds.submit("kept", rows=1, cost=1))
        await asyncio.sleep(0.01)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        # Its admission capacity is given back at once: its payload must not stay queued until the next round.
        held = len(rounds._queue)
        return held, await asyncio.gather(first, kept)

    assert await _with(rounds, body) == (1, ["A", "KEPT"])
    assert run.rounds == [["a"], ["kept"]]


async def test_close_ends_the_requests_still_queued():
    run = Recorder(delay=5.0)
    rounds = Coalescer(run, max_rows=1, max_cost=100)
    rounds.start()
    running = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
    queued = asyncio.create_task(rounds.submit("b", rows=1, cost=1))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(rounds.close(), 1.0)
    for task in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)


async def test_close_ends_a_request_whose_round_had_not_started():
    # close() may land between the round's task being made and its first step, where no finally of it runs.
    rounds = Coalescer(Recorder(delay=0.01), max_rows=100, max_cost=100)
    rounds.start()
    request = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
    while not rounds._rounds:
        await asyncio.sleep(0)
    assert rounds.stats.rounds == 0  # made, not started
    await rounds.close()  # in this task: wait_for's task of its own would let the round start first
    done, _ = await asyncio.wait([request], timeout=1.0)
    assert done and request.cancelled()


async def test_a_request_that_leaves_mid_round_waits_for_the_round_to_end():
    # Admission is released when the request's task ends; ending before the round does would admit new
    # work while this work still runs.
    run = Recorder(delay=0.2)
    rounds = Coalescer(run, max_rows=100, max_cost=100)

    async def body():
        task = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return run.finished

    assert await _with(rounds, body) == [["a"]]


async def test_a_round_is_told_once_all_its_requests_have_left():
    run = Recorder(delay=0.3)
    rounds = Coalescer(run, max_rows=100, max_cost=100)

    async def body():
        first = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
        await asyncio.sleep(0.01)
        second = [asyncio.create_task(rounds.submit(p, rows=1, cost=1)) for p in ("b", "c")]
        await asyncio.sleep(0.35)  # the second round ("b", "c") runs
        told = [run.wanted()]
        second[0].cancel()
        await asyncio.sleep(0.01)
        told.append(run.wanted())
        second[1].cancel()
        await asyncio.sleep(0.01)
        told.append(run.wanted())
        await first
        await asyncio.gather(*second, return_exceptions=True)
        return told

    assert await _with(rounds, body) == [True, True, False]


async def test_several_rounds_in_flight():
    run = Recorder(delay=0.1)
    rounds = Coalescer(run, max_rows=100, max_cost=100, concurrency=2)

    async def body():
        loop = asyncio.get_running_loop()
        start = loop.time()
        a = asyncio.create_task(rounds.submit("a", rows=1, cost=1))
        await asyncio.sleep(0.01)
        await asyncio.gather(a, rounds.submit("b", rows=1, cost=1))
        return loop.time() - start

    assert await _with(rounds, body) < 0.18  # b did not wait for a's round
    assert run.rounds == [["a"], ["b"]]


# The Triton backend's handling of call outcomes, against a stand-in gRPC client.

SPEC = ModelSpec(
    served_name="t/embed", task="embed", source="t", max_length=16, encoder_inputs=("input_ids",), pad_token_id=0,
    vocab_size=10, dimension=2,
)  # fmt: skip


class _Result:
    def __init__(self, arrays):
        self.arrays = arrays

    def as_numpy(self, name):
        return self.arrays[name]


class FakeClient:
    """Answers each ensemble call with one row per text; ``status`` makes every call fail that way."""

    def __init__(self, status: str | None = None, bad_text: str | None = None, delay: float = 0.0):
        self.status = status
        self.bad_text = bad_text
        self.delay = delay
        self.calls = 0
        self.cancelled = 0

    async def infer(self, model, inputs, outputs, client_timeout):
        self.calls += 1
        texts = [t.decode() for t in deserialize_bytes_tensor(inputs[0]._raw_content)] if inputs else []
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.status:
            raise InferenceServerException(msg="fake", status=self.status)
        rows = int(inputs[0].shape()[0])
        if self.bad_text is not None and self.bad_text in texts:
            raise InferenceServerException(msg="tokenizer: bad input", status="StatusCode.INTERNAL")
        return _Result({
            # Each text's length in the first column: a row answered out of its place shows.
            "EMBEDDING": np.array([[len(t), 1] for t in texts] if len(texts) == rows else np.ones((rows, 2)), np.float32),
            "NUM_TOKENS": np.full((rows, 1), 3, np.int64),
            "TRUNCATED": np.zeros((rows, 1), np.bool_),
        })  # fmt: skip

    async def close(self):
        pass


class _Everything(set):
    def __contains__(self, model) -> bool:
        return True


def _backend(*clients: FakeClient, serves: list[set[str]] | None = None) -> TritonBackend:
    """Endpoints over these clients; ``serves``: each one's ready models (default: any asked for)."""
    backend = TritonBackend([f"fake:{i}" for i in range(len(clients))], timeout_s=1.0)
    backend.endpoints = []
    for i, client in enumerate(clients):
        e = type("E", (), {})()
        e.url, e.client, e.healthy, e.down_since, e.told, e.unreadable = f"fake:{i}", client, True, 0.0, set(), set()
        e.probing, e.dead = asyncio.Lock(), set()
        e.ready, e.found = (set(serves[i]) if serves else _Everything()), {}
        e.index = set(e.ready)
        backend.endpoints.append(e)
    return backend


class _DeadStubClient(FakeClient):
    """Answers as Triton does once a Python stub of the model died, until ``dead`` is cleared."""

    def __init__(self):
        super().__init__()
        self.dead = True

    async def infer(self, model, inputs, outputs=None, client_timeout=None):
        if self.dead:
            self.calls += 1
            message = f"in ensemble '{model}', Stub process '{model}__tokenizer_0_0' is not healthy."
            raise InferenceServerException(msg=message, status="StatusCode.INTERNAL")
        return await super().infer(model, inputs, outputs, client_timeout)


async def test_a_dead_stub_moves_its_model_to_other_endpoints_until_it_answers_again(caplog):
    # Triton (since 24.06) does not start a dead Python stub again and still says the model is ready: each request
    # got a 502 from that endpoint, for ever, with other endpoints serving the model beside it (checked with the pip
    # tritonserver: "Stub process 'test--embed__tokenizer_0_0' is not healthy." after a SIGKILL of that stub).
    dead = _DeadStubClient()
    backend = _backend(dead, FakeClient())
    backend._next = -1  # the dead endpoint first
    out = await backend._ensemble(SPEC, _Rows(["猫"], None, False))
    assert out.values.shape == (1, 2) and dead.calls == 1
    assert "Triton does not start a dead stub again" in caplog.text
    await backend._ensemble(SPEC, _Rows(["犬"], None, False))
    assert dead.calls == 1  # not asked again while its stub is dead
    # Alone, it is a 503 that names the model and the restart, not a 502.
    alone = _backend(_DeadStubClient())
    with pytest.raises(BackendUnavailable, match=r"t/embed: .*Stub process .* is not healthy"):
        await alone._ensemble(SPEC, _Rows(["猫"], None, False))
    with pytest.raises(BackendUnavailable, match=r"a Python stub of t/embed died in Triton at fake:0: restart"):
        await alone._ensemble(SPEC, _Rows(["猫"], None, False))
    # The probe asks it one short text; once that is answered, it serves the model again.
    e = backend.endpoints[0]
    e.found = {SPEC.served_name: SPEC}
    await backend._ask_dead(e, 1.0)
    assert e.dead == {SPEC.name}
    dead.dead = False
    await backend._ask_dead(e, 1.0)
    assert not e.dead


async def test_a_deadline_is_a_504_and_keeps_the_endpoint():
    backend = _backend(FakeClient(status="StatusCode.DEADLINE_EXCEEDED"), FakeClient())
    backend._next = -1  # the slow endpoint first
    with pytest.raises(BackendTimeout):
        await backend._ensemble(SPEC, _Rows(["猫"], None, False))
    assert all(e.healthy for e in backend.endpoints)
    assert backend.endpoints[1].client.calls == 0  # a slow call is not retried elsewhere: that multiplies the load


async def test_an_unreachable_endpoint_is_dropped_and_the_call_retried():
    backend = _backend(FakeClient(status="StatusCode.UNAVAILABLE"), FakeClient())
    backend._next = -1
    out = await backend._ensemble(SPEC, _Rows(["猫"], None, False))
    assert out.values.shape == (1, 2)
    assert [e.healthy for e in backend.endpoints] == [False, True]


async def test_a_model_one_endpoint_lacks_is_asked_of_the_others_and_the_endpoint_kept():
    # NOT_FOUND (a model unloaded there) used to take the whole endpoint out of rotation until the next probe.
    backend = _backend(FakeClient(status="StatusCode.NOT_FOUND"), FakeClient(), serves=[{SPEC.name, "other"}, {SPEC.name}])
    backend._next = -1
    out = await backend._ensemble(SPEC, _Rows(["猫"], None, False))
    assert out.values.shape == (1, 2)
    assert [e.healthy for e in backend.endpoints] == [True, True]
    assert backend.endpoints[0].ready == {"other"}  # asked for its other models still; the probe learns them again
    assert [e.url for e in backend._order(SPEC, SPEC.name)] == ["fake:1"]


async def test_each_endpoint_is_asked_only_for_its_own_models():
    backend = _backend(FakeClient(), FakeClient(), serves=[{"a"}, {SPEC.name}])
    for _ in range(3):
        await backend._ensemble(SPEC, _Rows(["猫"], None, False))
    assert [e.client.calls for e in backend.endpoints] == [0, 3]
    with pytest.raises(BackendUnavailable, match=r"no ready Triton endpoint serves t/embed \(its Triton model nowhere\)"):
        await backend._infer(SPEC, "nowhere", [], ["EMBEDDING"], 1.0)


async def test_an_ensemble_unloaded_beside_its_steps_is_learnt_again():
    # Its NOT_FOUND left the endpoint's ready set equal to Triton's new index, so the probe saw no change and the
    # model stayed listed (a 503 for ever instead of a 404).
    class Probed(FakeClient):
        index: ClassVar[set[str]] = {SPEC.name, "t--embed__tokenizer", "t--embed__encoder"}

        async def is_server_ready(self, client_timeout):
            return True

        async def get_model_repository_index(self, as_json, client_timeout):
            return {"models": [{"name": n, "state": "READY"} for n in sorted(self.index)]}

    backend = _backend(Probed(status="StatusCode.NOT_FOUND"), serves=[set(Probed.index)])
    backend.endpoints[0].found = {SPEC.served_name: SPEC}
    backend._learn()

    async def discover(e, ready):
        return {SPEC.served_name: SPEC} if SPEC.name in ready else {}

    backend._discover = discover
    Probed.index = {"t--embed__tokenizer", "t--embed__encoder"}  # the ensemble unloaded
    with pytest.raises(BackendUnavailable):
        await backend._ensemble(SPEC, _Rows(["猫"], None, False))
    await backend._probe(backend.endpoints[0])
    assert backend.specs() == [] and not backend.endpoints[0].healthy


async def test_a_model_whose_spec_cannot_be_read_is_skipped_and_named_once(caplog):
    # One such model (hand-edited, or exported by a version that wrote other fields) took the whole endpoint down,
    # every model with it, and said so only at DEBUG: /health 503 for ever, with nothing in the log.
    from tritonclient.grpc import model_config_pb2 as mc

    from fos_runtime.spec import SPEC_PARAMETER

    class Probed(FakeClient):
        starting = True

        async def is_server_ready(self, client_timeout):
            if self.starting:
                raise ConnectionRefusedError("starting")
            return True

        async def get_model_repository_index(self, as_json, client_timeout):
            return {"models": [{"name": n, "state": "READY"} for n in ("good", "broken")]}

        async def get_model_config(self, name, client_timeout):
            c = mc.ModelConfig(name=name, platform="ensemble")
            text = SPEC.to_json() if name == "good" else '{"served_name": "x", "task": "embed"}'
            c.parameters[SPEC_PARAMETER].string_value = text
            return type("R", (), {"config": c})()

    backend = _backend(Probed(), serves=[set()])
    backend.endpoints[0].healthy = False
    with caplog.at_level("WARNING", logger="fos.triton"):
        for _ in range(3):
            assert not await backend._probe(backend.endpoints[0])
        Probed.starting = False
        for _ in range(3):  # probes repeat
            assert await backend._probe(backend.endpoints[0])
            backend.endpoints[0].index = set()  # as if the index changed: learnt again
    assert backend.specs() == [SPEC]
    told = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(told) == 1 and "fos_spec cannot be read" in told[0]
    assert len([r for r in caplog.records if "not ready: starting" in r.getMessage()]) == 1  # was DEBUG only


async def test_an_older_probe_never_lands_after_a_newer_one():
    # ready() probes beside the probe loop: a slow probe's older index written last would stand until the next one.
    class Probed(FakeClient):
        answers: ClassVar[list] = [({"old"}, 0.2), ({"new"}, 0.0)]

        async def is_server_ready(self, client_timeout):
            return True

        async def get_model_repository_index(self, as_json, client_timeout):
            names, delay = self.answers.pop(0)
            await asyncio.sleep(delay)
            return {"models": [{"name": n, "state": "READY"} for n in names]}

    backend = _backend(Probed(), serves=[set()])

    async def discover(e, ready):
        return {}

    backend._discover = discover
    first = asyncio.create_task(backend._probe(backend.endpoints[0]))
    await asyncio.sleep(0.05)
    await asyncio.gather(first, backend._probe(backend.endpoints[0]))
    assert backend.endpoints[0].index == {"new"}


def test_a_name_is_asked_only_of_endpoints_holding_the_same_export():
    # Mid-way through re-exporting a name from another source, one endpoint answers with the other model.
    import dataclasses

    backend = _backend(FakeClient(), FakeClient())
    backend.endpoints[0].found = {SPEC.served_name: dataclasses.replace(SPEC, source="another")}
    backend.endpoints[1].found = {SPEC.served_name: SPEC}
    assert [e.url for e in backend._order(SPEC, SPEC.name)] == ["fake:1"]


def test_the_models_served_are_every_endpoints():
    import dataclasses

    backend = _backend(FakeClient(), FakeClient())
    other = dataclasses.replace(SPEC, served_name="org/other")
    backend.endpoints[0].found = {SPEC.served_name: SPEC}
    backend.endpoints[1].found = {"org/other": other, SPEC.served_name: dataclasses.replace(SPEC, max_length=7)}
    backend._learn()
    assert backend._specs == {SPEC.served_name: SPEC, "org/other": other}  # where two differ, the first endpoint's


async def test_a_failed_call_cancels_its_siblings():
    backend = _backend(FakeClient(delay=0.5))

    async def call(g):
        if g == [0]:
            raise BackendFailed("boom")
        return await backend._infer(SPEC, "m", [], ["EMBEDDING"], 5.0)

    with pytest.raises(BackendFailed):
        await backend._fan_out([[0], [1], [2]], call)
    assert backend.endpoints[0].client.cancelled == 2


async def test_a_triton_request_past_the_round_budget_goes_in_pieces_answered_in_place(monkeypatch):
    import dataclasses

    from fos_runtime import batching
    from shim.backends import triton

    monkeypatch.setattr(triton, "plan_for", lambda device: dataclasses.replace(batching.plan_for(device), round_tokens=5))
    client = FakeClient()
    backend = _backend(client)
    texts = ["a" * n for n in (3, 1, 4, 1, 5, 9, 2, 6)]
    try:
        out = await backend._submit(SPEC, _Rows(texts, None, False))
    finally:
        await backend.close()
    assert out.values[:, 0].tolist() == [len(t) for t in texts] and out.tokens == [3] * len(texts)
    assert backend.stats()[SPEC.served_name].rounds == len(pieces([len(t) for t in texts], 5)) == 6


async def test_in_a_failed_round_only_the_request_at_fault_fails():
    backend = _backend(FakeClient(bad_text="壊"))
    results = await backend._run_round(
        SPEC, [_Rows(["猫"], None, False), _Rows(["壊"], None, False), _Rows(["犬", "鳥"], None, False)]
    )
    assert isinstance(results[1], BackendFailed)
    assert results[0].values.shape == (1, 2) and results[2].values.shape == (2, 2)


async def test_requests_of_other_document_caps_do_not_fail_with_one_at_fault():
    # Each max_tokens_per_doc goes in calls of its own; a request alone at its cap failed all of the round.
    backend = _backend(FakeClient(bad_text="壊"))
    results = await backend._run_round(
        SPEC, [_Rows(["猫"], None, False, 5), _Rows(["犬", "鳥"], None, False, 5), _Rows(["壊"], None, False, 7)]
    )
    assert isinstance(results[2], BackendFailed)
    assert results[0].values.shape == (1, 2) and results[1].values.shape == (2, 2)


def test_gpu_calls_hold_a_row_buckets_worth_each():
    # An ONNX Runtime backend runs each call as it comes: calls of bucket sizes keep its shapes few.
    import dataclasses

    from shim.backends.triton import _calls

    lengths = list(range(1, 46))
    cpu = _calls(SPEC, lengths)
    assert [len(c) for c in cpu] == [32, 13]
    gpu = _calls(dataclasses.replace(SPEC, device="gpu"), lengths)
    assert sorted(len(c) for c in gpu) == [1, 4, 8, 32]
    assert sorted(i for c in gpu for i in c) == list(range(45))


def test_a_call_padded_to_a_long_row_holds_fewer_rows():
    # Padded to its longest row, one long document among 255 short ones made a call of 256 x 8,192 tokens.
    import dataclasses

    from shim.backends.triton import _calls

    for device in ("cpu", "gpu"):
        s = dataclasses.replace(SPEC, device=device, max_length=8192)
        lengths = [100] * 255 + [20_000]
        calls = _calls(s, lengths)
        budget = plan_for(device).max_tokens
        assert all(len(c) * min(max(lengths[i] for i in c), s.max_length) <= max(budget, s.max_length) for c in calls)
        assert sorted(i for c in calls for i in c) == list(range(256))
        assert [255] in calls  # alone


def test_a_gpu_call_is_bounded_by_its_padded_tokens():
    # The bound counted characters, but the tokenizer model adds special tokens and pads to a length bucket: 160 rows
    # of 400 characters passed as 64,000, and became 160 x 416 = 66,560 tokens (a Triton config review).
    import dataclasses

    from shim.backends.triton import _calls

    s = dataclasses.replace(SPEC, device="gpu", max_length=8192)
    lengths = [400] * 300
    budget = plan_for("gpu").max_tokens
    calls = _calls(s, lengths)
    assert all(len(c) * bucket_length(400 + 2, s.max_length) <= budget for c in calls), [len(c) for c in calls]
    assert sorted(i for c in calls for i in c) == list(range(300))


class _ShapeClient(FakeClient):
    """Records the shape of each call's first input."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    async def infer(self, model, inputs, outputs, client_timeout):
        self.shapes.append(tuple(inputs[0].shape()))
        rows = int(inputs[0].shape()[0])
        return _Result({"EMBEDDING": np.ones((rows, 2), np.float32)})


async def test_token_ids_reach_a_gpu_encoder_in_its_warmed_shapes():
    # Text is padded to a length bucket by the tokenizer model; token ids went to the encoder at their own widths,
    # shapes its warm-up never ran (~47 ms each on ONNX Runtime's CUDA provider).
    import dataclasses

    from fos_runtime.padding import ROW_BUCKETS, bucket_length
    from fos_runtime.tokenization import Encoded

    client = _ShapeClient()
    s = dataclasses.replace(SPEC, device="gpu", max_length=512, vocab_size=100)
    lengths = [3, 17, 17, 50, 77, 130, 300, 511]
    out = await _backend(client).embed(s, encoded=Encoded([[5] * n for n in lengths]))
    assert out.values.shape == (len(lengths), 2)
    widths = {w for _, w in client.shapes}
    assert widths == {bucket_length(w, s.max_length) for w in widths} and all(r in ROW_BUCKETS for r, _ in client.shapes)


def test_a_ragged_gpu_encoder_gets_a_round_in_as_few_calls_as_its_batch_size_allows():
    # Triton's Python encoder regroups rows itself: row buckets there would only multiply the requests.
    import dataclasses

    from shim.backends.triton import _calls

    gpu = dataclasses.replace(SPEC, device="gpu", ragged=True)
    assert [len(c) for c in _calls(gpu, list(range(1, 46)))] == [45]
    assert [len(c) for c in _calls(gpu, [5] * 300)] == [256, 44]
    # A repository exported before the spec said so: taken as an encoder that runs each call as it comes.
    import json

    old = json.loads(gpu.to_json())
    del old["ragged"]
    assert not ModelSpec.from_json(json.dumps(old)).ragged


async def test_models_take_turns_and_a_model_with_two_rounds_at_once_runs_both():
    # Embedded encoders spread over every core: rounds of two models never compute at once. One whose encoder takes
    # two rounds (an encoder with streams) runs both, but not past a round of another model that asked first.
    from shim.backends.embedded import Turns

    turns, log = Turns(), []
    gates = {name: asyncio.Event() for name in ("a1", "a2", "b1", "a3")}

    async def round_(model: str, name: str) -> None:
        async with turns.turn(model):
            log.append(f"+{name}")
            await gates[name].wait()
            log.append(f"-{name}")

    tasks = []
    for model, name in (("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3")):
        tasks.append(asyncio.create_task(round_(model, name)))
        await asyncio.sleep(0.01)
    assert log == ["+a1", "+a2"]  # a's two at once; b waits, and a's third waits behind b
    gates["a1"].set()
    await asyncio.sleep(0.01)
    assert log == ["+a1", "+a2", "-a1"]  # b still waits for a's other round
    gates["a2"].set()
    await asyncio.sleep(0.01)
    assert log[-2:] == ["-a2", "+b1"]
    gates["b1"].set()
    gates["a3"].set()
    await asyncio.gather(*tasks)
    assert log[-3:] == ["-b1", "+a3", "-a3"]
    # A round cancelled while it waits gives its place up.
    gates.update(x=asyncio.Event(), y=asyncio.Event())
    first = asyncio.create_task(round_("a", "x"))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(round_("b", "y"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    gates["x"].set()
    await first

    async def another_model() -> None:
        async with turns.turn("c"):
            pass

    await asyncio.wait_for(another_model(), 1)
