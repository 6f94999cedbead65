"""The shared tokenize / pad / batch code."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fos_runtime import spec
from fos_runtime.batching import cheapest_runs
from fos_runtime.padding import bucket_length, bucket_rows, pad
from fos_runtime.spec import ModelSpec, known_prompts, triton_name
from fos_runtime.tokenization import Encoded, truncate_ids

from fakes import EchoEncoder

ALL = spec.ENCODER_INPUTS_ALL


def test_pad_right_with_mask_and_zero_types():
    arrays = pad(Encoded([[5, 6, 7], [8]]), pad_token_id=0, inputs=ALL)
    assert arrays["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert arrays["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert arrays["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert all(a.dtype.name == "int64" for a in arrays.values())


def test_pad_order_and_types():
    enc = Encoded([[1, 2], [3, 4, 5]], token_type_ids=[[0, 1], [0, 0, 1]])
    arrays = pad(enc, pad_token_id=9, inputs=("input_ids", "token_type_ids"), order=[1])
    assert set(arrays) == {"input_ids", "token_type_ids"}
    assert arrays["input_ids"].tolist() == [[3, 4, 5]]
    assert arrays["token_type_ids"].tolist() == [[0, 0, 1]]


def test_truncate_ids():
    cut = truncate_ids([[1, 2, 3, 4], [5], [6, 7]], 2)
    assert cut.input_ids == [[1, 2], [5], [6, 7]]
    assert cut.truncated == [True, False, False]
    # A sequence closed by the tokenizer's end token keeps it, as the tokenizer's truncation does.
    cut = truncate_ids([[2, 5, 6, 7, 3], [2, 5, 6, 7], [2, 3]], 3, end_token_id=3)
    assert cut.input_ids == [[2, 5, 3], [2, 5, 6], [2, 3]] and cut.truncated == [True, True, False]


def test_tokenizer_tells_which_inputs_it_cut(tmp_path):
    from fos_runtime.tokenization import Tokenizer

    import tiny_models

    tiny_models.build_tokenizer(tmp_path).save_pretrained(str(tmp_path))
    full = Tokenizer(tmp_path, max_length=10_000)
    text = "".join(tiny_models.corpus())
    n = len(full.encode([text]).input_ids[0])
    # The same text under a context of exactly its length, one less, and one more.
    for max_length, cut in ((n, False), (n - 1, True), (n + 1, False)):
        tok = Tokenizer(tmp_path, max_length=max_length)
        assert tok.encode([text, "猫"]).truncated is None  # not asked: no second tokenization
        enc = tok.encode([text, "猫"], detect_truncation=True)
        assert enc.truncated == [cut, False], max_length
        assert enc.lengths[0] == min(n, max_length)
    # Pairs: truncation is of the pair as a whole.
    pair = full.encode(["猫"], [text])
    m = len(pair.input_ids[0])
    assert Tokenizer(tmp_path, max_length=m).encode(["猫"], [text], detect_truncation=True).truncated == [False]
    assert Tokenizer(tmp_path, max_length=m - 1).encode(["猫"], [text], detect_truncation=True).truncated == [True]


def test_mecab_never_sees_more_than_the_context_can_use(tmp_path, monkeypatch):
    # MeCab's time grows with the square of a run of unknown characters (50,000 'a': 1.3 s under the tokenizer's
    # lock). A text is cut to max_length x MECAB_CHARS_PER_TOKEN characters first, and the cut is reported.
    from fos_runtime import tokenization
    from fos_runtime.tokenization import Tokenizer

    import tiny_models

    tiny_models.build_tokenizer(tmp_path).save_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path, max_length=8)
    limit = 8 * tokenization.MECAB_CHARS_PER_TOKEN
    seen: list[int] = []
    call = tok.hf.__class__.__call__

    def recording(self, texts, pairs=None, **kwargs):
        seen.extend(len(t) for t in [*texts, *(pairs or [])])
        return call(self, texts, pairs, **kwargs)

    monkeypatch.setattr(tok.hf.__class__, "__call__", recording)
    word = "猫" + "a" * (limit * 10)  # one long word: fewer tokens than characters / MECAB_CHARS_PER_TOKEN
    enc = tok.encode([word, "猫"], detect_truncation=True)
    assert max(seen) <= limit and enc.truncated == [True, False]
    assert enc.input_ids[0] == tok.encode([word[:limit]]).input_ids[0]
    seen.clear()
    pairs = tok.encode(["猫"], [word], detect_truncation=True)
    assert max(seen) <= limit and pairs.truncated == [True]
    # What MeCab skips (spaces, blank lines) counts toward no cut: the words after it are kept, and nothing was cut.
    for gap in (" ", "\n", "\u3000"):
        padded = "東京" + gap * (limit * 2) + "大阪"
        assert tok.encode([padded], detect_truncation=True).input_ids[0] == tok.hf([padded])["input_ids"][0]
        assert tok.encode(["猫"], [padded], detect_truncation=True).truncated == [False]
    assert tokenization.mecab_cut("ab  cd  ef", 3) == "ab  c"
    assert tokenization.mecab_cut("ab  cd", 4) == "ab  cd"
    assert tokenization.mecab_cut("a\r" * 4, 3) == "a\ra"  # a carriage return is no space to MeCab


def test_tokenizer_reads_past_control_characters(tmp_path):
    # Every tokenization path (Triton's tokenizer model too, for clients that call Triton directly)
    # sees a control character as a space; MeCab alone stops at a NUL.
    from fos_runtime.tokenization import Tokenizer

    import tiny_models

    tiny_models.build_tokenizer(tmp_path).save_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path, max_length=64)
    spaced = tok.encode(["テスト テスト"], ["猫 犬"]).input_ids
    assert tok.encode(["テスト\x00テスト"], ["猫\x1f犬"]).input_ids == spaced
    assert tok.hf(["テスト\x00テスト"])["input_ids"] != tok.hf(["テスト テスト"])["input_ids"]  # what it fixes


@given(
    st.lists(st.integers(1, 600), max_size=200),
    st.integers(1, 40),
    st.integers(1, 5000),
    st.integers(0, 5000),
    st.booleans(),
)
def test_cheapest_runs_cover_every_input_once_within_limits(lengths, max_rows, max_tokens, run_cost, buckets):
    limit = 512 if buckets else None
    runs = cheapest_runs(lengths, max_rows, max_tokens, run_cost, limit, buckets)
    assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
    for r in runs:
        width = max(lengths[i] for i in r)
        rows = len(r)
        if buckets:
            width, rows = bucket_length(width, 512), bucket_rows(rows)
        assert 1 <= len(r) <= max_rows
        assert len(r) == 1 or rows * width <= max_tokens


def _cost(lengths, runs, run_cost, buckets=False):
    if buckets:
        return sum(run_cost + bucket_rows(len(r)) * bucket_length(max(lengths[i] for i in r), 512) for r in runs)
    return sum(run_cost + len(r) * max(lengths[i] for i in r) for r in runs)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=9), st.integers(0, 400), st.booleans())
def test_cheapest_runs_cost_least(lengths, run_cost, buckets):
    # Against every way of cutting the sorted inputs into runs, where the limits do not bind; with buckets, the
    # shapes padding.pad makes (a few short rows may join a longer run to fill its row bucket).
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        _cost(lengths, [order[a:b] for a, b in itertools.pairwise([0, *cuts, len(order)])], run_cost, buckets)
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    limit = 512 if buckets else None
    runs = cheapest_runs(lengths, 1000, 10**9, run_cost, limit, buckets)
    assert _cost(lengths, runs, run_cost, buckets) == best


def test_cheapest_runs_weigh_a_run_against_its_padding():
    # One run would cost 4 x 193 padded tokens: two cost 3 x 15 + 193 and one run more.
    assert cheapest_runs([12, 14, 15, 193], max_rows=32, max_tokens=8192, run_cost_tokens=8) == [[0, 1, 2], [3]]
    # Where a run costs more than all the padding (a GPU's kernel launches), one run.
    assert cheapest_runs([12, 14, 15, 193], max_rows=32, max_tokens=8192, run_cost_tokens=3000) == [[0, 1, 2, 3]]
    # Where runs are free, no padding at all.
    assert cheapest_runs([5, 3, 5, 4], max_rows=32, max_tokens=8192, run_cost_tokens=0) == [[1], [3], [0, 2]]
    # The row limit splits similar inputs, the shortest together.
    assert cheapest_runs([100, 3, 100, 3, 100, 3], max_rows=3, max_tokens=10_000, run_cost_tokens=8) == [[1, 3, 5], [0, 2, 4]]


def test_a_cpu_runs_fixed_cost_follows_its_threads():
    # A run's fixed cost stays while each token's falls with the threads: --threads 4 on a big host is not every core.
    from fos_runtime import batching
    from fos_runtime.cores import available_cores

    per_core = batching.PLANS["cpu"].run_cost_tokens
    assert batching.plan_for("cpu", 4).run_cost_tokens == 4 * per_core
    assert batching.plan_for("cpu").run_cost_tokens == available_cores() * per_core
    assert batching.plan_for("gpu", 4).run_cost_tokens == batching.PLANS["gpu"].run_cost_tokens


def test_cheapest_runs_cost_the_shapes_that_buckets_make():
    # 17 and 30 tokens are one width (32) once bucketed: no reason to part them, whatever a run costs.
    assert cheapest_runs([17, 30], 256, 65536, 0, length_limit=512) == [[0, 1]]
    assert cheapest_runs([17, 30], 256, 65536, 0) == [[0], [1]]
    # 33 rows of one width hold a 48-row bucket; 32 of them and one more run, with a 1-row bucket, cost less.
    runs = cheapest_runs([20] * 33, 256, 65536, 8, length_limit=512, bucket_rows_too=True)
    assert sorted(len(r) for r in runs) == [1, 32]
    # The token limit counts bucketed rows: 48 x 32 would pass unbucketed (33 x 32 = 1,056 <= 1,100), not bucketed.
    runs = cheapest_runs([20] * 33, 256, 1100, 3000, length_limit=512, bucket_rows_too=True)
    assert all(bucket_rows(len(r)) * 32 <= 1100 for r in runs)


def test_triton_names_and_known_prompts():
    assert triton_name("cl-nagoya/ruri-large") == "cl-nagoya--ruri-large"
    for bad in ("a b", "../x", "x__encoder", ""):
        try:
            triton_name(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    assert known_prompts("cl-nagoya/ruri-large") == {"query": "クエリ: ", "document": "文章: "}
    assert known_prompts("cl-nagoya/ruri-v3-310m")["query"] == "検索クエリ: "
    assert known_prompts("cl-nagoya/ruri-reranker-large") == {}


def test_spec_round_trip():
    s = ModelSpec(
        served_name="cl-nagoya/ruri-large",
        task="embed",
        source="cl-nagoya/ruri-large",
        max_length=512,
        encoder_inputs=("input_ids", "attention_mask"),
        pad_token_id=0,
        vocab_size=32768,
        dimension=1024,
        prompts=known_prompts("cl-nagoya/ruri-large"),
        default_prompt_name="document",
    )
    assert ModelSpec.from_json(s.to_json()) == s


def test_specs_exported_before_prompts_read_their_prefixes():
    raw = json.loads(_spec().to_json())
    raw.pop("prompts")
    raw.pop("default_prompt_name")
    raw["prefixes"] = {"query": "クエリ: "}
    assert ModelSpec.from_json(json.dumps(raw)).prompts == {"query": "クエリ: "}


def _spec(**kw) -> ModelSpec:
    return ModelSpec(
        served_name="m",
        task="embed",
        source="m",
        max_length=8192,
        encoder_inputs=("input_ids", "attention_mask"),
        pad_token_id=3,
        vocab_size=100,
        **kw,
    )


def test_prompts_resolve_as_sentence_transformers_does_and_are_never_doubled():
    v3 = {"query": "検索クエリ: ", "document": "検索文書: ", "topic": "トピック: ", "": ""}
    s = _spec(prompts=v3)
    assert s.with_prompt(["猫", "犬"], "query") == ["検索クエリ: 猫", "検索クエリ: 犬"]
    assert s.with_prompt(["猫"], None) == ["猫"]  # no default prompt: nothing
    assert s.with_prompt(["猫"], "") == ["猫"]
    # Dify's query_prefix "検索クエリ:" joined with a space already gave the text its prompt.
    assert s.with_prompt(["検索クエリ: 猫"], "query") == ["検索クエリ: 猫"]
    # A prompt asked for by name goes before a text that begins with another: it is content (a document that begins
    # "トピック: " embedded as a topic was cosine 0.938 from encode(prompt_name="document"), review).
    assert s.with_prompt(["トピック: 会議"], "document") == ["検索文書: トピック: 会議"]
    assert s.with_prompt(["検索クエリ:猫"], "query") == ["検索クエリ: 検索クエリ:猫"]  # not the prompt: prepended
    with_default = _spec(prompts=v3, default_prompt_name="document")
    assert with_default.with_prompt(["猫", "検索クエリ: 犬"], None) == ["検索文書: 猫", "検索クエリ: 犬"]
    assert with_default.with_prompt(["猫"], "query") == ["検索クエリ: 猫"]
    try:
        s.prompt("nonsense")
    except KeyError:
        pass
    else:
        raise AssertionError("unknown prompt names must not resolve")


def test_tokenizer_is_safe_to_share_between_threads(tmp_path):
    # fugashi's MeCab tagger breaks when two threads use it at once; the embedded backend tokenizes
    # requests in a thread pool.
    from concurrent.futures import ThreadPoolExecutor

    from fos_runtime.tokenization import Tokenizer

    import tiny_models

    tiny_models.build_tokenizer(tmp_path).save_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path, max_length=32)
    texts = tiny_models.corpus()
    want = tok.encode(texts).input_ids
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: tok.encode(texts).input_ids, range(200)))
    assert all(r == want for r in results)


def _both_kinds_of_tokenizer(tmp_path):
    """ruri v1's Python tokenizer (MeCab + WordPiece) and ruri v3's fast SentencePiece-style one."""
    from bench import random_models

    import tiny_models

    tiny_models.build_tokenizer(tmp_path / "v1").save_pretrained(str(tmp_path / "v1"))
    random_models.sentencepiece_tokenizer(tmp_path / "v3", tiny_models.corpus(), random_models.TINY_V3)
    return [tmp_path / "v1", tmp_path / "v3"]


def test_documents_cut_to_max_pair_tokens(tmp_path):
    from fos_runtime.tokenization import Tokenizer

    import tiny_models

    text = "".join(tiny_models.corpus())
    queries, docs = ["猫", text[:40], text, "東京"], [text, "犬", text[:200], "京都"]
    cap = 5
    for folder in _both_kinds_of_tokenizer(tmp_path):
        for max_length in (32, 64, 4096):
            tok = Tokenizer(folder, max_length=max_length)
            plain = tok.encode(queries, docs)
            # A cap nothing reaches changes nothing.
            assert tok.encode(queries, docs, max_pair_tokens=100_000).input_ids == plain.input_ids, (folder, max_length)
            capped = tok.encode(queries, docs, max_pair_tokens=cap, detect_truncation=True)
            specials = tok.hf.num_special_tokens_to_add(pair=True)
            for i, (q, d) in enumerate(zip(queries, docs, strict=True)):
                ids = capped.input_ids[i]
                q_tokens = tok.hf(q, add_special_tokens=False)["input_ids"]
                kept = tok.hf(d, add_special_tokens=False)["input_ids"][:cap]
                fits = len(q_tokens) + len(kept) + specials <= max_length
                assert len(ids) == min(len(q_tokens) + len(kept) + specials, max_length)
                if fits:  # the document's first tokens, before the pair's closing special token
                    assert ids[-1 - len(kept) : -1] == kept, (folder, max_length, i)
                # The client's cut is not truncation; the context's still is.
                assert capped.truncated[i] == (not fits), (folder, max_length, i)


def test_long_pairs_take_little_memory(tmp_path):
    # A cut keeps the rest in overflowing parts of the cap's size, and the pair paired each with a copy of the query:
    # 40,000 tokens cut to 7 beside an 8,192-token query took 24 GB (a fuzzing review). Measured in a process of its own,
    # whose peak is this call's.
    import subprocess
    import sys

    folder = _both_kinds_of_tokenizer(tmp_path)[1]
    script = f"""
import resource, sys
from fos_runtime.tokenization import Tokenizer
tok = Tokenizer({str(folder)!r}, max_length=4096)
query, doc = "ー" * 9000, "東京は日本の首都です。" * 300
tok.encode(["猫"], ["犬"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
capped = tok.encode([query], [doc], max_pair_tokens=1)
kept = tok.hf(doc, add_special_tokens=False)["input_ids"][:1]
assert capped.input_ids[0][-1 - len(kept) : -1] == kept and len(capped.input_ids[0]) == 4096
# No cap: the tokenizer's own pair truncation paired every overflowing part of one text with each of the other's.
short = Tokenizer({str(folder)!r}, max_length=256)
assert short.encode([query], [query * 2]).lengths == [256]
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb = int(done.stdout.split()[-1])
    assert grown_mb < 200, grown_mb


def test_capped_pairs_ignore_padding_a_tokenizer_json_sets(tmp_path):
    # Padding set in tokenizer.json applied to each part and again to the pair: pad ids inside the pair.
    from fos_runtime.tokenization import Tokenizer

    folder = _both_kinds_of_tokenizer(tmp_path)[1]
    tok = Tokenizer(folder, max_length=64)
    tok.hf.backend_tokenizer.enable_padding(pad_to_multiple_of=8, pad_id=tok.hf.pad_token_id)
    capped = tok.encode(["猫"], ["東京は日本の首都です。"], max_pair_tokens=100_000).input_ids
    assert tok.hf.backend_tokenizer.padding is not None  # given back as it was
    tok.hf.backend_tokenizer.no_padding()
    assert capped == tok.encode(["猫"], ["東京は日本の首都です。"]).input_ids


def test_shape_buckets_bound_what_a_gpu_engine_sees():
    from fos_runtime.padding import ROW_BUCKETS, bucket_length, bucket_rows

    assert [bucket_length(n, 512) for n in (1, 16, 17, 64, 65, 500, 512)] == [16, 16, 32, 64, 96, 512, 512]
    assert bucket_length(700, 8192) == 768 and bucket_length(500, 500) == 500  # never past the model's context
    assert len({bucket_length(n, 512) for n in range(1, 513)}) == 18
    assert [bucket_rows(n) for n in (1, 3, 17, 200, 256, 300)] == [1, 4, 24, 224, 256, 320]
    assert all(bucket_rows(b) == b for b in ROW_BUCKETS)
    arrays = pad(Encoded([[5, 6, 7], [8]]), pad_token_id=0, inputs=ALL, length_limit=512, bucket_rows_too=True)
    assert arrays["input_ids"].shape == (2, 16)
    arrays = pad(Encoded([[5, 6, 7], [8], [9, 9]]), pad_token_id=0, inputs=ALL, length_limit=512, bucket_rows_too=True)
    assert arrays["input_ids"].shape == (4, 16)  # the extra row repeats the first: a real sequence
    assert arrays["input_ids"][3].tolist()[:3] == [5, 6, 7] and arrays["attention_mask"][3].sum() == 3


def test_bucketed_runs_answer_as_plain_ones():
    # The GPU plan pads runs to bucket shapes; the rows it adds are dropped, the others unchanged.
    import dataclasses

    from fos_runtime import batching

    seqs = [[i + 1] * n for i, n in enumerate([3, 17, 1, 40, 2])]
    plain = batching.PLANS["cpu"]
    bucketed = dataclasses.replace(batching.PLANS["gpu"])
    for plan in (plain, bucketed):
        (out,) = batching.run(EchoEncoder(), [Encoded(seqs)], 0, ALL, plan, max_length=512)
        assert out.tolist() == [[len(s), s[0]] for s in seqs]
    stats = batching.Stats()
    batching.run(EchoEncoder(), [Encoded(seqs)], 0, ALL, bucketed, stats, max_length=512)
    assert stats.rows == len(seqs) and stats.computed_tokens % 16 == 0


@given(
    st.lists(st.integers(1, 300), max_size=60), st.integers(1, 6), st.integers(1, 32), st.integers(300, 8192), st.integers(0, 200)
)
def test_stream_runs_cover_every_row_once_and_never_keep_the_round_longer(lengths, streams, max_rows, max_tokens, run_cost):
    from fos_runtime.batching import _busiest_stream, stream_runs

    def costs(runs):
        return [run_cost + len(r) * max(lengths[i] for i in r) for r in runs]

    cheapest = cheapest_runs(lengths, max_rows, max_tokens, run_cost)
    runs = stream_runs(lengths, cheapest, streams, max_rows, max_tokens, run_cost)
    assert sorted(i for r in runs for i in r) == list(range(len(lengths)))  # every row once
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for r in runs:  # neighbours by length, within the limits
        assert r == order[order.index(r[0]) : order.index(r[0]) + len(r)]
        assert len(r) <= max_rows and (len(r) == 1 or len(r) * max(lengths[i] for i in r) <= max_tokens)
    assert costs(runs) == sorted(costs(runs), reverse=True)  # costliest first, as the streams should take them
    assert _busiest_stream(costs(runs), streams) <= _busiest_stream(costs(cheapest), streams)


def test_stream_runs_even_out_the_streams_of_a_rerank_round():
    # One rerank request: 10 pairs of 60-240 tokens on 4 streams of 4 threads (a run costs 20 tokens' worth). The
    # cheapest runs (6) leave two on one stream: 430 padded tokens against 400 once cut into runs of even cost.
    from fos_runtime import batching

    lengths = [60, 75, 90, 101, 120, 133, 150, 171, 190, 240]
    plan = batching.plan_for("cpu", 4)
    cheapest = plan.runs(lengths)
    runs = batching.stream_runs(lengths, cheapest, 4, plan.max_rows, plan.max_tokens, plan.run_cost_tokens)

    def busiest(rs):
        return batching._busiest_stream([20 + len(r) * max(lengths[i] for i in r) for r in rs], 4)

    assert (len(cheapest), busiest(cheapest)) == (6, 430)
    assert (len(runs), busiest(runs)) == (8, 400)
    # Fewer runs than streams: the long row alone, the short ones together.
    assert batching.stream_runs([1, 1, 1, 9], [[0, 1, 2, 3]], 2, 32, 8192, 0) == [[3], [0, 1, 2]]


def test_a_round_of_fewer_runs_than_streams_is_cut_for_the_streams():
    # One run's worth of rows (the CPU plan keeps 6 similar rows together) on an engine with 4 streams: 3 runs of two
    # at once (a fourth would not end the round sooner); answers as with one stream.
    from fos_runtime import batching

    seqs = [[i + 1] * n for i, n in enumerate([12, 10, 11, 12, 9, 12])]
    one, four = EchoEncoder(), EchoEncoder(streams=4)
    s1, s4 = batching.Stats(), batching.Stats()
    (want,) = batching.run(one, [Encoded(seqs)], 0, ALL, batching.plan_for("cpu", 16), s1)
    (got,) = batching.run(four, [Encoded(seqs)], 0, ALL, batching.plan_for("cpu", 4), s4)
    assert got.tolist() == want.tolist() == [[len(q), q[0]] for q in seqs]
    assert (one.rounds, four.rounds, s1.runs, s4.runs) == ([1], [3], 1, 3)


def test_a_round_stops_between_runs_once_nobody_wants_it():
    from fos_runtime import batching

    encoded = [Encoded(input_ids=[[5] * n]) for n in range(1, 100)]
    plan = dataclasses.replace(batching.PLANS["cpu"], max_rows=8, run_cost_tokens=0)
    encoder = EchoEncoder()
    whole = batching.run(encoder, encoded, 0, ALL, plan, wanted=lambda: True)
    assert len(whole) == len(encoded) and sum(encoder.rounds) > 3
    asked: list[int] = []
    encoder = EchoEncoder()
    with pytest.raises(batching.Abandoned):
        batching.run(encoder, encoded, 0, ALL, plan, wanted=lambda: bool(asked.append(1)))
    assert encoder.rounds == [1] and len(asked) == 1  # the first run is always run: a round starts only if wanted


def test_warm_up_runs_each_bucketed_shape_once():
    from fos_runtime import batching

    seen = []

    class Recorder:
        def run(self, feeds):
            seen.append(feeds["input_ids"].shape)

    assert batching.warm_up(Recorder(), batching.PLANS["cpu"], 0, ALL, 512) == 0  # a CPU has no shapes to warm
    n = batching.warm_up(Recorder(), batching.PLANS["gpu"], 0, ALL, 512)
    assert n == len(seen) == len(set(seen)) and (1, 16) in seen and (256, 256) in seen and (256, 512) not in seen


_SEQS = st.lists(st.lists(st.integers(1, 30_000), min_size=1, max_size=40), min_size=0, max_size=12)


@given(parts=st.lists(_SEQS, min_size=1, max_size=5), bucketed=st.booleans())
def test_rows_cut_from_padded_requests_are_what_pad_makes_of_the_same_rows(parts, bucketed):
    """Triton's encoder merges requests that arrive padded (``merge_padded``) and cuts runs from them (``take``):
    each run must be exactly what ``pad`` makes of those rows from lists."""
    import numpy as np

    from fos_runtime.padding import merge_padded, take

    encodeds = [Encoded(seqs, token_type_ids=[[i % 2 for i in range(len(s))] for s in seqs]) for seqs in parts]
    arrived = [pad(e, pad_token_id=3, inputs=ALL) for e in encodeds]  # as the tokenizer model sends them
    limit = 512 if bucketed else None
    merged, lengths = merge_padded(arrived, pad_token_id=3, length_limit=limit)
    flat = Encoded([s for e in encodeds for s in e.input_ids], [t for e in encodeds for t in e.token_type_ids or []])
    assert lengths.tolist() == flat.lengths
    rows = len(flat.input_ids)
    for order in (list(range(rows)), list(range(rows))[::2], [rows - 1] if rows else []):
        got = take(merged, lengths, order, length_limit=limit, bucket_rows_too=bucketed)
        want = pad(flat, 3, ALL, order=order, length_limit=limit, bucket_rows_too=bucketed)
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_padded_requests_run_as_lists_do_and_a_bad_one_is_named():
    import numpy as np
    import pytest

    from fos_runtime import batching
    from fos_runtime.padding import check_padded

    class Echo(EchoEncoder):
        def run(self, feeds):
            width = np.full(len(feeds["input_ids"]), feeds["input_ids"].shape[1])  # the run's shape: both paths agree on it
            return np.column_stack([super().run(feeds), width]).astype(np.float32)

    parts = [Encoded([[i + 1] * n for i, n in enumerate(lens)]) for lens in ([3, 17], [1], [40, 2, 9])]
    padded = [check_padded(pad(e, 0, ALL), ALL, 512, 100) for e in parts]
    for plan in (batching.PLANS["cpu"], batching.PLANS["gpu"]):
        s1, s2 = batching.Stats(), batching.Stats()
        want = batching.run(Echo(), parts, 0, ALL, plan, s1, max_length=512)
        got = batching.run_padded(Echo(), padded, 0, plan, s2, max_length=512)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]
        assert (s1.runs, s1.rows, s1.real_tokens, s1.computed_tokens) == (s2.runs, s2.rows, s2.real_tokens, s2.computed_tokens)
    # A malformed request among good ones: refused alone (the encoder answers it with the error), the others as before.
    placeholder = {name: np.zeros((0, 0), dtype=np.int64) for name in ALL}
    got = batching.run_padded(Echo(), [padded[0], placeholder, padded[2]], 0, batching.PLANS["gpu"], max_length=512)
    want = batching.run(Echo(), [parts[0], parts[2]], 0, ALL, batching.PLANS["gpu"], max_length=512)
    assert [g.tolist() for g in got] == [want[0].tolist(), [], want[1].tolist()]

    good = pad(Encoded([[5, 6, 7], [8]], token_type_ids=[[0, 0, 1], [0]]), 0, ALL)

    def refused(change: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            check_padded({**good, **change}, ALL, max_length=3, vocab_size=10)

    refused({"attention_mask": None}, "wants input_ids, attention_mask, token_type_ids")
    refused({"attention_mask": np.ones((2, 2))}, "one shape")
    refused({"attention_mask": np.array([[1, 1, 1], [0, 1, 0]])}, "1s .at least one., then 0s")  # left-padded
    refused({"attention_mask": np.array([[1, 1, 1], [0, 0, 0]])}, "at least one")
    refused({"attention_mask": np.array([[400, 400, 400], [1, 0, 0]])}, "then 0s")
    refused({"input_ids": np.array([[5, 6, 10], [8, 0, 0]])}, r"token ids must be in \[0, 10\)")
    refused({"token_type_ids": np.array([[0, 0, 2], [0, 0, 0]])}, "0 or 1")
    with pytest.raises(ValueError, match="longer than the model's 2 tokens"):
        check_padded(good, ALL, max_length=2, vocab_size=10)
    assert check_padded(good, ALL, max_length=3, vocab_size=10)["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="differ in length"):
        pad(Encoded([[5, 6, 7]], token_type_ids=[[0, 1, 1, 1]]), 0, ALL)
