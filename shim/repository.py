"""Read what export wrote: the served models of a Triton model repository.

The metadata lives in each ensemble's ``config.pbtxt`` (parameter ``fos_spec``), the file Triton
itself reads, so the embedded backend and Triton always agree on what is served.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fos_runtime import spec


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def spec_of(config: mc.ModelConfig) -> spec.ModelSpec | None:
    if config.platform != "ensemble" or spec.SPEC_PARAMETER not in config.parameters:
        return None
    return spec.ModelSpec.from_json(config.parameters[spec.SPEC_PARAMETER].string_value)


class Unreadable(ValueError):
    """A model's config.pbtxt that cannot be parsed (edited by hand, or a copy cut short)."""


def read_spec(config_file: Path) -> spec.ModelSpec | None:
    """The spec in one model's config.pbtxt; None for a model that is not an exported ensemble."""
    try:
        return spec_of(parse(config_file.read_text(encoding="utf-8")))
    except (text_format.ParseError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise Unreadable(f"{config_file} cannot be read ({exc}); export that model again") from exc


def read_specs(repository: Path) -> list[spec.ModelSpec]:
    found = []
    for config_file in sorted(Path(repository).glob("*/config.pbtxt")):
        s = read_spec(config_file)
        if s is not None:
            found.append(s)
    return found


def missing_parts(repository: Path, s: spec.ModelSpec) -> list[str]:
    """What the ensemble ``s`` names that is not in the repository: its tokenizer's files or its encoder's model (a
    folder removed by hand, or a copy cut short)."""
    parts = {"tokenizer": spec.tokenizer_files(repository, s.name), "encoder": spec.encoder_file(repository, s.name)}
    return [f"its {part} ({path})" for part, path in parts.items() if not path.exists()]
