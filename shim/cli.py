"""The ``fos`` command: ``export``, ``serve``, ``triton`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fos", description="OpenAI-compatible embeddings and rerank for Japanese models")
    sub = p.add_subparsers(dest="command", required=True)

    from export.main import add_arguments as export_arguments

    export_arguments(sub.add_parser("export", help="convert a Hugging Face model into a Triton model set"))

    from .serve import add_arguments as serve_arguments

    serve_arguments(sub.add_parser("serve", help="serve the OpenAI-compatible API"))

    from .triton_server import add_arguments as triton_arguments

    triton_arguments(sub.add_parser("triton", help="run the tritonserver from the nvidia-pytriton wheel"))

    from bench.loadgen import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="load-test a server on loopback (dify-embed, batch-embed, rerank)"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "export":
        from export.main import run

        return run(args)
    if args.command == "serve":
        from .serve import run

        return run(args)
    if args.command == "bench":
        from bench.loadgen import run

        return run(args)
    from .triton_server import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
