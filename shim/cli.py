"""The ``fos`` command: ``export``, ``serve``, ``triton`` and ``bench``.

A command whose package is not installed is left out (``bench``, not in the serving image); export imports
torch only when it runs, so serving needs neither.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# command -> (module with add_arguments and run, help)
COMMANDS = {
    "export": ("export.main", "convert a Hugging Face model into a Triton model set"),
    "serve": ("shim.serve", "serve the OpenAI-compatible API"),
    "triton": ("shim.triton_server", "run the tritonserver from the nvidia-pytriton wheel"),
    "bench": ("bench.loadgen", "load-test a server on loopback (dify-embed, batch-embed, rerank)"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is absent
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fos", description="OpenAI-compatible embeddings and rerank for Japanese models")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        if _installed(module):
            importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args))


if __name__ == "__main__":
    sys.exit(main())
