"""Run many inputs, from one or several requests, through the encoder in length-grouped batches.

Shared by the embedded backend (requests coalesced in process) and Triton's Python-backend encoder
(requests of different lengths that Triton's dynamic batcher hands over together, ragged).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np

from . import spec
from .cores import available_cores
from .encoder import Encoder
from .padding import ROW_BUCKETS, bucket_length, bucket_rows, merge_padded, pad, take
from .tokenization import Encoded


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How much work goes to the encoder at once on one kind of device: the one place these numbers
    live. Export writes ``max_rows`` as every Triton model's ``max_batch_size`` (``execution_rows`` for the Python
    encoder, which cuts its own runs) and ``queue_delay_us`` as the encoder's batching delay; the encoders cut their
    runs by ``max_rows``/``max_tokens``; the shim gathers rounds of ``round_tokens`` and never sends Triton more than
    ``max_rows`` rows a call."""

    max_rows: int  # rows per encoder run (and per Triton request)
    # Rows Triton hands a ragged encoder (Triton's Python-backend one) at once, from several requests: it cuts its own
    # runs from them, and the more rows it sorts, the closer in length each run's rows are.
    execution_rows: int
    max_tokens: int  # padded tokens per encoder run
    round_tokens: int  # real tokens gathered from waiting requests into one round
    queue_delay_us: int  # how long Triton's dynamic batcher waits for more requests
    tokenizer_instances: int  # Triton tokenizer processes: MeCab + WordPiece does ~130k tokens/s on one core
    shape_buckets: bool  # round run shapes up to a few buckets (padding.py: a GPU pays for every new shape)
    # What a run costs the device beyond its padded tokens (kernel launches, a pass over the weights, threads
    # meeting at each layer), counted in padded tokens: runs are cut where that costs less than the padding it saves.
    run_cost_tokens: int
    # Rounds the shim keeps in flight per model and Triton endpoint. A CPU encoder computes one at a time, and a
    # round that waits for it gathers more requests: 8 at dify-embed c=16 on 2 cores, against 5 with two in flight.
    # (Those clients send their next request on an answer and alternate in two halves; rounds of all 16, commit
    # 37605f6, served no faster there: docs/benchmarks.md.) A GPU encoder is fed while Triton tokenizes the next
    # rounds. On an H100 (dify-embed c=256, docs/benchmarks.md), 4 rounds a worker instead of 2 gave 1.16x the
    # tokens/s with 4 shim workers and the same with 8 (8 rounds: +2%, and more Triton calls for the same rows).
    rounds_in_flight: int

    def bucket_limit(self, max_length: int | None) -> int | None:
        """The model's context where this plan pads runs to shape buckets (it bounds them), else None."""
        return max_length if self.shape_buckets else None

    def runs(self, lengths: Sequence[int], max_length: int | None = None, streams: int = 1) -> list[list[int]]:
        """The cheapest runs of these rows, in the shapes this plan pads them to (``max_length``: the model's context);
        for an engine with ``streams`` above 1, cut again so that its busiest stream ends first (``stream_runs``)."""
        limit = self.bucket_limit(max_length)
        runs = cheapest_runs(lengths, self.max_rows, self.max_tokens, self.run_cost_tokens, limit, limit is not None)
        if streams > 1:
            runs = stream_runs(lengths, runs, streams, self.max_rows, self.max_tokens, self.run_cost_tokens)
        return runs


# A CPU is saturated by 32 rows; a GPU is not: on an H200, ruri-large fp16 ran 1.33x faster in runs of
# up to 256 rows / 65536 tokens than of 32 / 8192 (bench/gpu.py, docs/benchmarks.md).
PLANS = {
    # On a CPU the encoder wants every core; on a GPU host the cores feed the GPU.
    "cpu": BatchPlan(
        max_rows=32,
        execution_rows=32,
        max_tokens=8192,
        round_tokens=32768,
        queue_delay_us=2_000,
        tokenizer_instances=1,
        shape_buckets=False,
        # Per core: plan_for multiplies. A run's fixed cost (10-17 ms for ruri-large's shape) stays as threads are
        # added while each token's falls: 3-6 padded tokens' worth on one Zen 4 core, 8-12 on two (OpenVINO bf16);
        # 96 on 16 AMX cores (bench.engine_shapes, docs/benchmarks.md).
        run_cost_tokens=5,
        rounds_in_flight=1,
    ),
    "gpu": BatchPlan(
        max_rows=256,
        # batch-embed c=32 through Triton on bench.fake_gpu (the fitted H100 costs x20, this 2-core CPU, two runs):
        # 256 rows an execution 12,775 and 12,416 tokens/s; 512: 14,881 and 14,459; 1024 (441 rows used): 15,237 and
        # 15,386, p50 and p95 lower too. dify-embed c=128 (42 rows an execution) the same within 5%.
        # On the H100 itself (fifth run) batch-embed c=32 executions held ~220 rows: a fast GPU never lets 1024 queue.
        execution_rows=1024,
        max_tokens=65536,
        round_tokens=65536,
        queue_delay_us=500,
        tokenizer_instances=4,
        shape_buckets=True,
        # ruri-large fp16 on an H100: 4.15 ms a run and 1.38 us a padded token, fitted to the served executions of
        # one run; the same costs predict its encoder alone within 2% (docs/benchmarks.md). Small runs cost their
        # kernel launches, not their tokens.
        run_cost_tokens=3000,
        rounds_in_flight=4,
    ),
}
DEVICES = tuple(PLANS)


def plan_for(device: str, threads: int | None = None) -> BatchPlan:
    """The plan for an encoder on ``device`` in this process: on a CPU, one whose runs each have ``threads`` threads
    (default: every core)."""
    if device not in PLANS:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    plan = PLANS[device]
    if device == "cpu":
        return dataclasses.replace(plan, run_cost_tokens=plan.run_cost_tokens * (threads or available_cores()))
    return plan


@dataclasses.dataclass
class Stats:
    runs: int = 0
    rows: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    seconds: float = 0.0  # inside the encoder's runs

    def add(self, other: Stats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / tokens computed (padding included)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


def cheapest_runs(
    lengths: Sequence[int],
    max_rows: int,
    max_tokens: int,
    run_cost_tokens: int,
    length_limit: int | None = None,
    bucket_rows_too: bool = False,
) -> list[list[int]]:
    """Group input indices into the runs that cost the encoder least, in padded tokens: each run its rows x width
    (both rounded up to their buckets where ``length_limit`` / ``bucket_rows_too`` say so, as ``padding.pad`` will),
    plus ``run_cost_tokens``. Sorted by length, a run takes neighbours, at most ``max_rows`` of them and
    ``max_tokens`` padded tokens; a single input longer than that still gets a run of its own.

    The search runs over the sorted rows, each the last of a run of every size it may have. With row buckets only
    the bucket sizes are tried: a run of r rows costs what one of its bucket's size does, and starting that run
    earlier never costs the rows before it more (15 sizes a row, however many rows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    widths = [max(lengths[i], 1) for i in order]
    if length_limit is not None:
        widths = [bucket_length(w, length_limit) for w in widths]
    # best[j]: the least cost of the j shortest rows; cut[j]: where the last of their runs begins.
    best = [0] * (len(order) + 1)
    cut = [0] * (len(order) + 1)
    sizes_of: dict[int, list[int]] = {}  # by width: the run sizes to try
    for j in range(1, len(order) + 1):
        width = widths[j - 1]
        sizes = sizes_of.get(width)
        if sizes is None:
            sizes = sizes_of[width] = _run_sizes(width, max_rows, max_tokens, bucket_rows_too)
        found = -1
        for size in sizes:  # ascending: on a tie, the larger run (fewer runs) wins
            if size >= j:  # the run starts at the first row: it holds j rows, in their bucket
                cost = run_cost_tokens + width * (bucket_rows(j) if bucket_rows_too else j)
                if found < 0 or cost <= found:
                    found, cut[j] = cost, 0
                break
            cost = best[j - size] + run_cost_tokens + width * size
            if found < 0 or cost <= found:
                found, cut[j] = cost, j - size
        best[j] = found
    runs: list[list[int]] = []
    j = len(order)
    while j:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


def stream_runs(
    lengths: Sequence[int], runs: Sequence[list[int]], streams: int, max_rows: int, max_tokens: int, run_cost_tokens: int
) -> list[list[int]]:
    """Runs of the same rows for an engine that computes ``streams`` runs at once, costliest first: the order in which
    its free streams should take them. ``runs`` (``cheapest_runs``) cost the least in all; what a round waits for is
    its busiest stream, so the rows are also cut into S, 2S, ... runs of at most equal cost (neighbours by length,
    within ``max_rows`` and ``max_tokens``), and the cut whose busiest stream ends first wins (on a tie, the one that
    costs least in all). On the AMX host's 4 streams (docs/benchmarks.md) a rerank round's 10 rows in 5-6 cheapest runs
    kept one stream busy for two of them while the others waited."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    widths = [max(lengths[i], 1) for i in order]

    def cost(run: Sequence[int]) -> int:
        return run_cost_tokens + len(run) * max(max(lengths[i], 1) for i in run)

    def cut_within(limit: int) -> list[list[int]]:
        """The fewest runs of neighbours each costing at most ``limit`` (a row alone may cost more)."""
        cut: list[list[int]] = []
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and j - i < max_rows and (j + 1 - i) * widths[j] <= min(max_tokens, limit - run_cost_tokens):
                j += 1
            cut.append(order[i:j])
            i = j
        return cut

    candidates = [[list(r) for r in runs]]
    for k in range(streams, streams * -(-len(runs) // streams) + 1, streams):
        # The least limit that needs at most k runs: beyond it, more rows a run never adds runs.
        low, high = run_cost_tokens + widths[-1], run_cost_tokens + len(widths) * widths[-1]
        while low < high:
            mid = (low + high) // 2
            if len(cut_within(mid)) <= k:
                high = mid
            else:
                low = mid + 1
        candidates.append(cut_within(low))

    def busiest_then_total(cut: list[list[int]]) -> tuple[int, int]:
        costs = [cost(r) for r in cut]
        return _busiest_stream(costs, streams), sum(costs)

    best = min(candidates, key=busiest_then_total)
    return sorted(best, key=cost, reverse=True)


def _busiest_stream(costs: Sequence[int], streams: int) -> int:
    """The load of the busiest of ``streams`` streams when runs of these costs go, costliest first, each to the stream
    that is free first (what ``Encoder.run_many``'s pool does with runs in that order)."""
    loads = [0] * streams
    for c in sorted(costs, reverse=True):
        heapq.heapreplace(loads, loads[0] + c)
    return max(loads)


def _run_sizes(width: int, max_rows: int, max_tokens: int, bucket_rows_too: bool) -> list[int]:
    """The sizes a run of this width may have, ascending: at most ``max_rows`` rows and ``max_tokens`` padded tokens
    (only bucket sizes where rows are rounded up to their bucket); one row at least."""
    if bucket_rows_too:
        return [b for b in ROW_BUCKETS if b <= max_rows and b * width <= max_tokens] or [1]
    return list(range(1, max(1, min(max_rows, max_tokens // width)) + 1))


WARM_UP_LONGEST = 1024  # tokens: past this a shape's first run is rare enough to pay for when it comes


def warm_up(
    encoder: Encoder,
    plan: BatchPlan,
    pad_token_id: int,
    inputs: Sequence[str],
    max_length: int,
    longest: int = WARM_UP_LONGEST,
) -> int:
    """Run every bucketed shape the plan can produce, up to ``longest`` tokens, once: the first run of a shape is
    the slow one. Returns the number of shapes run."""
    shapes = warm_up_shapes(plan, max_length, longest)
    for rows, width in shapes:
        sample = Encoded(input_ids=[[pad_token_id] * width] * rows)
        encoder.run(pad(sample, pad_token_id, inputs))
    return len(shapes)


def warm_up_shapes(plan: BatchPlan, max_length: int, longest: int = WARM_UP_LONGEST) -> list[tuple[int, int]]:
    """(rows, tokens) of every bucketed run shape the plan can produce up to ``longest`` tokens; none where the plan
    does not bucket shapes. The encoders run them at load, Triton's ONNX Runtime backend from its config's
    ``model_warmup``."""
    if not plan.shape_buckets:
        return []
    widths = sorted({bucket_length(n, max_length) for n in range(1, min(max_length, longest) + 1)})
    return [
        (rows, width) for rows in ROW_BUCKETS for width in widths if rows <= plan.max_rows and rows * width <= plan.max_tokens
    ]


def merge(encodeds: Sequence[Encoded]) -> Encoded:
    """One Encoded of all inputs, in order: token types and truncation flags kept where any part has them."""
    ids: list[list[int]] = []
    types: list[list[int]] = []
    truncated: list[bool] = []
    for e in encodeds:
        ids.extend(e.input_ids)
        types.extend(e.token_type_ids or [[0] * len(seq) for seq in e.input_ids])
        truncated.extend(e.cut)
    with_types = any(e.token_type_ids is not None for e in encodeds)
    with_flags = any(e.truncated is not None for e in encodeds)
    return Encoded(input_ids=ids, token_type_ids=types if with_types else None, truncated=truncated if with_flags else None)


def run(
    encoder: Encoder,
    encodeds: Sequence[Encoded],
    pad_token_id: int,
    inputs: Sequence[str],
    plan: BatchPlan,
    stats: Stats | None = None,
    max_length: int | None = None,
    wanted: Callable[[], bool] | None = None,
) -> list[np.ndarray]:
    """One output array per element of ``encodeds``, rows in their order. ``max_length``, the model's
    context, bounds the shape buckets of a plan that uses them. ``wanted`` is asked before each step of runs but the
    first (a run; with streams, 4 × streams runs): once it says False, ``Abandoned`` is raised instead of running the
    rest."""
    merged = merge(encodeds)
    limit = plan.bucket_limit(max_length)

    def feeds(batch: list[int]) -> dict[str, np.ndarray]:
        return pad(merged, pad_token_id, inputs, order=batch, length_limit=limit, bucket_rows_too=limit is not None)

    return _run(encoder, merged.lengths, [len(e.input_ids) for e in encodeds], feeds, plan, stats, max_length, wanted)


def run_padded(
    encoder: Encoder,
    parts: Sequence[dict[str, np.ndarray]],
    pad_token_id: int,
    plan: BatchPlan,
    stats: Stats | None = None,
    max_length: int | None = None,
) -> list[np.ndarray]:
    """``run`` for requests that arrive padded (``padding.check_padded``; Triton's encoder): their rows are regrouped
    and cut from the arrays as they are, never turned into lists and back (3 ms of a 214-row execution)."""
    limit = plan.bucket_limit(max_length)
    arrays, lengths = merge_padded(parts, pad_token_id, limit)

    def feeds(batch: list[int]) -> dict[str, np.ndarray]:
        return take(arrays, lengths, batch, length_limit=limit, bucket_rows_too=limit is not None)

    return _run(encoder, lengths.tolist(), [len(p[spec.ATTENTION_MASK]) for p in parts], feeds, plan, stats, max_length)


class Abandoned(Exception):
    """Every request of the round has left: the runs not yet started were not run."""


def _run(
    encoder: Encoder,
    lengths: list[int],
    sizes: list[int],
    feeds_of: Callable[[list[int]], dict[str, np.ndarray]],
    plan: BatchPlan,
    stats: Stats | None,
    max_length: int | None,
    wanted: Callable[[], bool] | None = None,
) -> list[np.ndarray]:
    """The plan's runs over all rows (``lengths``), each fed by ``feeds_of``; the outputs split back into the
    parts of ``sizes`` rows."""
    batches = plan.runs(lengths, max_length, encoder.streams)
    if not batches:
        return [np.zeros((0, 0), dtype=np.float32) for _ in sizes]
    # A step's runs go to the engine together (OpenVINO with streams computes them at once); between steps the round
    # may stop. Several steps' worth of runs per stream keeps the streams busy when nobody leaves.
    step = 1 if encoder.streams == 1 else 4 * encoder.streams
    outs: list[np.ndarray] = []
    # Counted step by step: the runs of a round that fails or is left later took the encoder's time all the same.
    stats = stats if stats is not None else Stats()
    for k in range(0, len(batches), step):
        if k and wanted is not None and not wanted():
            raise Abandoned(f"stopped after {k} of {len(batches)} runs: every request of the round has left")
        taken = batches[k : k + step]
        feeds = [feeds_of(batch) for batch in taken]
        started = time.perf_counter()
        try:
            outs.extend(encoder.run_many(feeds))
        finally:
            stats.seconds += time.perf_counter() - started
        stats.runs += len(taken)
        stats.rows += sum(len(batch) for batch in taken)
        stats.real_tokens += sum(lengths[i] for batch in taken for i in batch)
        stats.computed_tokens += sum(f[spec.INPUT_IDS].size for f in feeds)
    result = np.empty((len(lengths), outs[0].shape[1]), dtype=np.float32)
    for batch, out in zip(batches, outs, strict=True):
        result[batch] = out[: len(batch)]
    bounds = np.cumsum([0, *sizes])
    return [result[a:b] for a, b in itertools.pairwise(bounds)]
