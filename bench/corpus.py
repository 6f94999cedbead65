"""Benchmark text: JGLUE (read in place from a path; never copied) or generated Japanese text."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

DEFAULT_JGLUE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "jglue"


@dataclasses.dataclass
class Corpus:
    source: str
    short: list[str]  # sentences, ~20-40 tokens
    long: list[str]  # paragraphs, ~100-500 tokens
    questions: list[tuple[str, int]]  # (question, index of its paragraph in long)


def load(path: Path | None = None) -> Corpus:
    folder = Path(path) if path else DEFAULT_JGLUE
    sts, squad = folder / "jsts-valid-v1.3.json", folder / "jsquad-valid-v1.3.json"
    if not (sts.exists() and squad.exists()):
        return generated()
    short: list[str] = []
    for line in sts.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            short.extend([row["sentence1"], row["sentence2"]])
    long: list[str] = []
    questions: list[tuple[str, int]] = []
    for article in json.loads(squad.read_text(encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            long.append(para["context"])
            questions.extend((qa["question"], len(long) - 1) for qa in para["qas"][:1])
    return Corpus(f"JGLUE v1.3 ({folder})", list(dict.fromkeys(short)), long, questions)


_WORDS = (
    "東京",
    "日本",
    "検索",
    "文章",
    "モデル",
    "サーバー",
    "天気",
    "料理",
    "電車",
    "映画",
    "学校",
    "会社",
    "公園",
    "図書館",
    "写真",
    "音楽",
    "技術",
    "研究",
    "経済",
    "歴史",
)
_PARTS = ("は", "が", "を", "に", "で", "と", "の")
_ENDS = ("です。", "でした。", "します。", "しました。", "と言われています。")


def generated(seed: int = 0) -> Corpus:
    """Japanese-looking text for a fresh clone without ``../shared``."""
    rng = random.Random(seed)

    def sentence() -> str:
        return "".join(rng.choice(_WORDS) + rng.choice(_PARTS) for _ in range(rng.randint(3, 8))) + rng.choice(_ENDS)

    short = [sentence() for _ in range(2000)]
    long = ["".join(sentence() for _ in range(rng.randint(5, 20))) for _ in range(300)]
    questions = [(sentence().rstrip("。") + "か？", i) for i in range(len(long))]
    return Corpus("generated", short, long, questions)
