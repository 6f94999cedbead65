"""Where an ONNX Runtime encoder's time goes on the CPU: each operator type's share of a run, by onnxruntime's own
profiler, in the session ``fos_runtime.encoder.Encoder`` builds (its options and graph optimisations, so the operators
are those that serve). Inputs are constant tokens, padded as serving pads them; speed does not depend on their values.

    uv run python -m bench.op_profile --repository DIR --model cl-nagoya/ruri-large --shapes 8x18,4x32
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from unittest import mock

import onnxruntime as ort

from fos_runtime import spec
from fos_runtime.encoder import Encoder

from .encoders import parse_shapes, served_spec, uniform_feeds
from .machine import describe


def shares(events: list[dict], runs: int) -> list[dict]:
    """Per shape, in the order run (each ``runs`` runs after one untimed), after the session's own first run at load:
    ms per run and each operator type's share of the operators' time, largest first."""
    starts = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_run: list[collections.Counter] = [collections.Counter() for _ in starts]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            k = next(i for i, (a, b) in enumerate(starts) if a <= e["ts"] <= b)
            per_run[k][e["args"]["op_name"]] += e["dur"]
    out = []
    for first in range(1, len(starts), runs + 1):
        timed = range(first + 1, first + runs + 1)
        ops: collections.Counter = sum((per_run[k] for k in timed), collections.Counter())
        total = sum(ops.values())
        ms = sum(starts[k][1] - starts[k][0] for k in timed) / runs / 1000
        out.append({"ms_per_run": ms, "shares": {op: t / total for op, t in ops.most_common()}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True, help="served name")
    p.add_argument("--shapes", default="8x18", help="ROWSxTOKENS, comma-separated")
    p.add_argument("--runs", type=int, default=20, help="timed runs per shape")
    p.add_argument("--threads", type=int, help="as fos serve --threads")
    args = p.parse_args()
    s = served_spec(args.repository, args.model)
    shapes = parse_shapes(args.shapes)
    real = ort.InferenceSession
    with tempfile.TemporaryDirectory(prefix="fos-op-profile-") as tmp:

        def profiled(path, sess_options, **kwargs):
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = str(Path(tmp) / "profile")
            return real(path, sess_options=sess_options, **kwargs)

        with mock.patch.object(ort, "InferenceSession", profiled):
            encoder = Encoder(
                spec.encoder_file(args.repository, s.name), threads=args.threads, device="cpu", precision=s.precision
            )
        for rows, length in shapes:
            feeds = uniform_feeds(s, rows, length)
            for _ in range(args.runs + 1):  # the first prepares the shape
                encoder.run(feeds)
        events = json.loads(Path(encoder.session.end_profiling()).read_text())
    results = []
    for (rows, length), r in zip(shapes, shares(events, args.runs), strict=True):
        top = ", ".join(f"{op} {share:.1%}" for op, share in list(r["shares"].items())[:6])
        print(f"{rows}x{length}: {r['ms_per_run']:.1f} ms a run; {top}", flush=True)
        results.append({"rows": rows, "tokens": length} | r)
    print(json.dumps({"engine": str(encoder.engine), "threads": encoder.run_threads, "results": results, "machine": describe()}))


if __name__ == "__main__":
    main()
