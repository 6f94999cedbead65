"""A Triton model repository whose encoder behaves like ruri-large fp16 on an H100, for trying the GPU path's
scheduling (rounds in flight, Triton's batching, padding and shape buckets) on a machine without a GPU.

It copies an exported embedding repository and rewrites it as a GPU export would be (the GPU batching plan, shape
buckets, ``max_length``), but the encoder does not compute: each run sleeps for what the GPU took for its padded
shape, times ``--scale``, and returns constant vectors. Tokenization, Triton, the shim and the load generator are
the real ones. Sleeping frees the CPU, so a scale of 10-20 keeps a 2-core machine's CPU out of the way of the
"GPU", the way the GPU machine's 16 cores mostly were; divide the throughput it measures by nothing: compare
settings with each other in one run, never with the GPU's figures.

Cost of a run, from the H100 runs in docs/benchmarks.md (milliseconds, padded tokens P = rows x width):
``run_ms + per_token_ms * P ** power``, fitted to the encoder's executions at seven served levels of the third run;
the same figures predict that run's encoder alone within 2% (395,598 tokens/s against 386,929 and 387,674 measured).

    python -m bench.fake_gpu --repository REPO --out FAKE_REPO --scale 20 [--run-cost-tokens 750]
    fos triton --repository FAKE_REPO ...    # then fos serve --triton, fos bench, as on the GPU machine
    python -m bench.fake_gpu --simulate TOKENIZER_DIR   # the cost model over served executions, per run cost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import repository
from fos_runtime import spec
from shim.repository import read_specs

COST = {"run_ms": 4.15, "per_token_ms": 0.00138, "power": 1.0}

# The encoder's model.py: the real one (kept beside it as fos_encoder_model.py) with a sleeping engine.
WRAPPER = '''"""bench.fake_gpu: the exported encoder model with an engine that sleeps like a GPU (fake_gpu.json)."""

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# First: the exported model puts the stub's PYTHONPATH in place, where numpy is found.
from fos_encoder_model import TritonPythonModel as _Exported

import numpy as np

from fos_runtime import batching, spec


class _SleepingGPU:
    engine = "fake-gpu"
    device = "gpu"
    reason = "bench.fake_gpu"
    streams = 1

    def __init__(self, input_names, dimension, fake):
        self.input_names = tuple(input_names)
        self.dimension = dimension
        self.fake = fake

    def run(self, feeds):
        rows, width = feeds[spec.INPUT_IDS].shape
        c = self.fake["cost"]
        time.sleep(self.fake["scale"] * (c["run_ms"] + c["per_token_ms"] * (rows * width) ** c["power"]) / 1000)
        return np.ones((rows, self.dimension), dtype=np.float32)

    def run_many(self, feeds):
        return [self.run(f) for f in feeds]


class TritonPythonModel(_Exported):
    def initialize(self, args):
        config = json.loads(args["model_config"])
        fake = json.loads((Path(__file__).parent / "fake_gpu.json").read_text())
        self.output_name = config["output"][0]["name"]
        self.spec = spec.ModelSpec.from_json(config["parameters"][spec.SPEC_PARAMETER]["string_value"])
        self.encoder = _SleepingGPU(self.spec.encoder_inputs, self.spec.dimension, fake)
        self.plan = dataclasses.replace(batching.plan_for("gpu"), **fake["plan"])
        self.stats = batching.Stats()
        self.report_every = fake["report_every"]
        self.executions = 0
        self.seconds = 0.0
'''


def make(source: Path, out: Path, scale: float, max_length: int, tokenizers: int, plan: dict) -> list[str]:
    """Copy ``source``'s embedding models into ``out`` as GPU exports with a sleeping encoder; their names."""
    if out.exists():
        shutil.rmtree(out)
    names = []
    for exported in read_specs(source):
        if exported.task != "embed":
            continue
        s = dataclasses.replace(exported, device="gpu", max_length=max_length, ragged=True)
        skip = shutil.ignore_patterns("model.onnx", "model.py", "fos_runtime", "__pycache__")
        for model in (s.name, spec.tokenizer_model(s.name), spec.encoder_model(s.name)):
            shutil.copytree(source / model, out / model, ignore=skip)
        # This checkout's runtime, not the one the source was exported with: what is tried is today's code.
        repository.copy_runtime(out / spec.tokenizer_model(s.name) / "1", "tokenizer_model.py")
        repository.copy_runtime(out / spec.encoder_model(s.name) / "1", "encoder_model.py")
        encoder = repository.encoder_config(s, "python")
        encoder.instance_group[0].kind = mc.ModelInstanceGroup.KIND_CPU  # no GPU here: the sleep stands for it
        configs = {
            s.name: repository.ensemble_config(s),
            spec.tokenizer_model(s.name): repository.tokenizer_config(s, tokenizers),
            spec.encoder_model(s.name): encoder,
        }
        for model, config in configs.items():
            (out / model / "config.pbtxt").write_text(repository.render(config))
        version = out / spec.encoder_model(s.name) / "1"
        (version / "model.py").rename(version / "fos_encoder_model.py")
        (version / "model.py").write_text(WRAPPER)
        fake = {"scale": scale, "cost": COST, "plan": plan, "report_every": 200}
        (version / "fake_gpu.json").write_text(json.dumps(fake, indent=1) + "\n")
        names.append(s.served_name)
    if not names:
        raise SystemExit(f"{source} holds no embedding model")
    return names


def run_ms(rows: int, width: int) -> float:
    return COST["run_ms"] + COST["per_token_ms"] * (rows * width) ** COST["power"]


def simulate(tokenizer_dir: Path, corpus: Path | None, max_length: int = 512) -> None:
    """What the cost model says executions of dify-embed and batch-embed requests are worth, by the run cost the GPU
    plan groups with (``batching.cheapest_runs``): the same grouping and buckets as the encoder, no Triton."""
    import random

    from transformers import AutoTokenizer

    from bench import corpus as corpora
    from fos_runtime import batching, padding

    texts = corpora.load(corpus)
    rng = random.Random(0)
    workloads = {
        "dify-embed": [rng.choice(texts.short) for _ in range(3072)],
        "batch-embed": [rng.choice(texts.long) if rng.random() < 0.25 else rng.choice(texts.short) for _ in range(6848)],
    }
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    own = batching.plan_for("gpu").run_cost_tokens
    for workload, sample in workloads.items():
        lengths = [len(x) for x in tokenizer(sample, truncation=True, max_length=max_length)["input_ids"]]
        print(f"{workload}: {len(lengths)} inputs, {sum(lengths) / len(lengths):.1f} tokens on average")
        for rows in (23, 48) if workload == "dify-embed" else (96, 214):
            executions = [lengths[k : k + rows] for k in range(0, len(lengths) - rows + 1, rows)]
            for cost in sorted({0, 750, own, 12000}):
                plan = dataclasses.replace(batching.plan_for("gpu"), run_cost_tokens=cost)
                ms = real = computed = runs = 0.0
                for lens in executions:
                    for run in plan.runs(lens, max_length):
                        width = padding.bucket_length(max(lens[i] for i in run), max_length)
                        height = padding.bucket_rows(len(run))
                        ms += run_ms(height, width)
                        real += sum(lens[i] for i in run)
                        computed += height * width
                        runs += 1
                n = len(executions)
                print(
                    f"{rows:5} rows an execution, a run costs {cost:5} tokens{' (the plan)' if cost == own else '':11}: "
                    f"{ms / n:6.2f} ms, {runs / n:.2f} runs, efficiency {real / computed:.2f}, {1000 * real / ms:9,.0f} tokens/s"
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, help="an exported repository (any device, Python encoder)")
    p.add_argument("--out", type=Path)
    p.add_argument("--simulate", type=Path, metavar="TOKENIZER_DIR", help="print the cost model's table instead")
    p.add_argument("--corpus", type=Path, help="JGLUE folder for --simulate (default ../shared/data/jglue)")
    p.add_argument("--scale", type=float, default=20.0, help="the sleeping GPU is this many times slower than the H100")
    p.add_argument("--max-length", type=int, default=512, help="ruri-large's context (a tiny model's may be shorter)")
    p.add_argument("--tokenizer-instances", type=int, default=2)
    p.add_argument("--run-cost-tokens", type=int, help="the GPU plan's run_cost_tokens instead of its own")
    args = p.parse_args()
    if args.simulate:
        return simulate(args.simulate, args.corpus, args.max_length)
    if not (args.repository and args.out):
        p.error("--repository and --out, or --simulate")
    plan = {} if args.run_cost_tokens is None else {"run_cost_tokens": args.run_cost_tokens}
    names = make(args.repository, args.out, args.scale, args.max_length, args.tokenizer_instances, plan)
    print(f"wrote {args.out}: {', '.join(names)} (a sleeping GPU, {args.scale:g}x slower than the H100)")


if __name__ == "__main__":
    main()
