"""Reader for LLaVA-format JSON / JSONL conversation data.

Records: ``{"id", "image": path | [paths] (optional), "conversations": [{"from": "human" |
"gpt" | "system", "value": "..."}], "category": optional}``. Image paths are relative to
``image_folder`` (default: the data file's folder). Structure and file existence are
checked when the file is opened; images are decoded lazily when a record is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from minigem.data.records import Message, Sample, text_length
from minigem.errors import DataError

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


@dataclass
class RawRecord:
    id: str
    messages: list[Message]
    image_paths: list[Path]
    category: str | None


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:  # name the file's line, not the record's
                raise DataError(f"{path}: line {n}: not valid JSON: {err.msg} (column {err.colno})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of records at the top level")
    return rows


def parse_record(row: object, index: int, source: Path, image_folder: Path,
                 image_token: str = "<image>") -> RawRecord:
    """Validate one record; errors name the record id and the file."""
    rid = str(row.get("id", f"#{index}")) if isinstance(row, dict) else f"#{index}"
    where = f"{source}: record {rid}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: missing or empty 'conversations'")
    messages = []
    for turn in convs:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each turn needs 'from' and a string 'value'")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(
                f"{where}: bad role {turn.get('from')!r} (expected human/gpt/system)"
            )
        messages.append(Message(role, turn["value"]))
    body = [m for m in messages if m.role != "system"]
    for k, m in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if m.role != want:
            raise DataError(f"{where}: turn {k + 1} is from {m.role}, expected {want} (turns must alternate)")
    if not body or body[-1].role != "assistant":  # (a system turn alone has no body)
        raise DataError(f"{where}: the last turn must be the assistant's answer")
    image = row.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    n_ph = sum(m.content.count(image_token) for m in messages)
    if n_ph == 0 and len(paths) == 1:
        # LLaVA convention: a single image without placeholder goes before the first question.
        first = next(i for i, m in enumerate(messages) if m.role == "user")
        messages[first] = Message("user", f"{image_token}\n{messages[first].content}")
        n_ph = 1
    if n_ph != len(paths):
        raise DataError(f"{where}: {n_ph} {image_token} placeholders but {len(paths)} images")
    full = [image_folder / p for p in paths]
    for p in full:
        if not p.is_file():
            raise DataError(f"{where}: image file not found: {p}")
    cat = row.get("category")
    return RawRecord(rid, messages, full, str(cat) if cat is not None else None)


class LlavaJsonDataset:
    """Map-style dataset of `Sample`s from a LLaVA JSON/JSONL file."""

    def __init__(self, path: str | Path, image_folder: str | Path | None = None,
                 skip_bad: bool = False, image_token: str = "<image>") -> None:
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder else self.path.parent
        self.skip_bad, self.image_token = skip_bad, image_token
        self.records: list[RawRecord] = []
        self.skipped = 0
        for i, row in enumerate(read_records(self.path)):
            try:
                self.records.append(parse_record(row, i, self.path, self.image_folder, image_token))
            except DataError as err:
                if not skip_bad:
                    raise
                self.skipped += 1
                log.warning("skipping bad record: %s", err)
        if self.skipped:
            log.warning("%s: skipped %d bad records (data.skip_bad=true)", self.path, self.skipped)
        if not self.records:
            raise DataError(f"{self.path}: no usable records")

    def __len__(self) -> int:
        return len(self.records)

    def length(self, i: int, tokens_per_image: int) -> int:
        """Record i's length proxy (`text_length`), from its text alone: no image is read."""
        rec = self.records[i]
        return text_length(rec.messages, tokens_per_image, self.image_token)

    def load(self, i: int) -> Sample:
        rec = self.records[i]
        images = []
        for p in rec.image_paths:
            try:
                with Image.open(p) as im:
                    im.load()
                    images.append(im.convert("RGB"))
            except (OSError, ValueError) as err:
                raise DataError(f"{self.path}: record {rec.id}: cannot read image {p}: {err}") from None
        return Sample(rec.id, list(rec.messages), images, rec.category, str(self.path))

    def __getitem__(self, i: int) -> Sample:
        if not self.skip_bad:
            return self.load(i)
        for k in range(len(self.records)):  # unreadable image: fall through to the next record
            try:
                return self.load((i + k) % len(self.records))
            except DataError as err:
                self.skipped += 1
                log.warning("skipping bad record: %s", err)
        raise DataError(f"{self.path}: no readable records")
