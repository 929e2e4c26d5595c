"""Instruction-tuning (SFT) data: chat records as a source, LLaDA's SFT rows as a layout.

After LLaDA (Nie et al. 2025, sec. 2.3): each example is one row of `length` tokens, the
chat-rendered prompt, then the answer, then EOS up to the end. The EOS padding belongs to the
answer (noised and scored) so the model learns where to stop; `loss_mask` marks the answer,
and the objective never masks the prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from diffusion.data.base import ConfigError, Layout, Source, stack_rows
from diffusion.data.chat import encode_chat, ensure_chat_template
from diffusion.data.sources import HFDataset

log = logging.getLogger(__name__)


def alpaca_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """An Alpaca row -> [user, assistant]: the instruction, with its `input` (if any) after a
    blank line, asks; `output` answers (tatsu-lab/alpaca's columns)."""
    bad = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if bad:
        raise ValueError(f"needs text fields {bad}; the row has fields {sorted(row)}")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"field 'input' must be text, got {type(extra).__name__}")
    user = row["instruction"].strip()
    if extra and extra.strip():
        user = f"{user}\n\n{extra.strip()}"
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": row["output"].strip()},
    ]


def row_to_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """One SFT record -> a conversation whose last message is the answer to learn.

    Accepts `{"messages": [{"role", "content"}, ...]}` (roles system/user/assistant; the last
    one the assistant's, everything before it is the prompt) or a pair: `prompt` or
    `instruction` (plus an optional Alpaca `input`) and `response` or `output`.
    """
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError("'messages' must be a list of at least a user and an assistant turn")
        out = []
        for i, m in enumerate(messages):
            ok = isinstance(m, dict) and isinstance(m.get("content"), str)
            if not ok or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(
                    f"messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': "
                    f"text}}, got {m!r}"
                )
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        return out
    ask = next((k for k in ("prompt", "instruction") if k in row), None)
    answer = next((k for k in ("response", "output") if k in row), None)
    if ask is None or answer is None:
        raise ValueError(
            'expected {"messages": [...]} or a "prompt"/"instruction" field and a '
            f'"response"/"output" field; the row has fields {sorted(row)}'
        )
    pair = {"instruction": row[ask], "input": row.get("input"), "output": row[answer]}
    return alpaca_messages(pair)


ROW_FORMATS: dict[str, Callable[[Mapping[str, Any]], list[dict[str, str]]]] = {
    "auto": row_to_messages,
    "alpaca": alpaca_messages,
}


def read_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) per non-blank line; a malformed line names the file and line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path} line {n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{path} line {n}: expected a JSON object, got {type(record).__name__}"
                )
            yield f"{path} line {n}", record


def _starts_with_array(path: str) -> bool:
    """Whether the file's first non-whitespace byte (after a UTF-8 BOM) is `[`: one JSON
    array of records (Alpaca's alpaca_data.json) rather than JSON lines."""
    with open(path, "rb") as f:
        head = f.read(3)
        head = head[3:] if head == b"\xef\xbb\xbf" else head
        while True:
            rest = head.lstrip(b" \t\r\n")
            if rest:
                return rest.startswith(b"[")
            head = f.read(1 << 16)
            if not head:
                return False


def read_json_array(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location "path record N", record) per element of a file holding one JSON array of
    objects; bad bytes or JSON name the file and line (and column), a non-object its index."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text") from None
    try:
        records = json.loads(text)  # starts with `[`: a list, or an error
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})"
        ) from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(
                f"{path} record {i}: expected a JSON object, got {type(record).__name__}"
            )
        yield f"{path} record {i}", record


def read_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) of a `path: json` data file: one JSON array of objects when its
    first non-whitespace byte is `[`, else JSON lines (`read_jsonl`)."""
    return read_json_array(path) if _starts_with_array(path) else read_jsonl(path)


def sft_rows(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], length: int, eos: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lay examples out as LLaDA's SFT rows: prompt, answer, then EOS up to `length`.

    Returns (input_ids int32 (N, length), loss_mask int8 (N, length), truncated, dropped):
    loss_mask is 1 from the answer's first token to the row's end (answer + EOS padding).
    An answer cut at `length` is kept and counted in `truncated` (it loses its final EOS);
    an example whose prompt alone leaves no room for an answer token is counted in `dropped`.
    """
    keep = [i for i, p in enumerate(prompts) if len(p) < length]
    ids = np.full((len(keep), length), eos, dtype=np.int32)
    loss_mask = np.zeros((len(keep), length), dtype=np.int8)
    truncated = 0
    for row, i in enumerate(keep):
        p, a = prompts[i], answers[i]
        room = length - len(p)
        truncated += len(a) > room
        a = a[:room]
        ids[row, : len(p)] = p
        ids[row, len(p) : len(p) + len(a)] = a
        loss_mask[row, len(p) :] = 1
    return ids, loss_mask, truncated, len(prompts) - len(keep)


class ChatRecords(HFDataset):
    """Conversations from json files (`path: json` + `data_files`: JSON lines, read line by
    line so a bad line is named by file and number, or one JSON array of records such as
    Alpaca's alpaca_data.json, `read_records`; a split may slice a file, `train[:95%]`) or from a
    Hugging Face dataset (`path: tatsu-lab/alpaca`); `row_format` turns a record into messages
    (ROW_FORMATS). `texts` gives the contents (what bpe/char tokenizers train on)."""

    def __init__(self, *, row_format: str = "auto", **kwargs: Any) -> None:
        if row_format not in ROW_FORMATS:
            raise ConfigError(f"data.source.row_format={row_format!r}: one of {list(ROW_FORMATS)}")
        super().__init__(**kwargs)
        self.row_format = row_format

    def records(self, split: str) -> list[tuple[str, Mapping[str, Any]]]:
        """(location, raw record) of every example of a split, first `max_docs` only."""
        if self.path == "json" and self.data_files:
            key, files = self.files(split)
            records = [r for f in files for r in read_records(f)]
            spec = str(self.split_spec(split))
            if spec != key:  # a slice of the files, e.g. train[:95%]
                import datasets

                (part,) = datasets.ReadInstruction.from_spec(spec).to_absolute({key: len(records)})
                records = records[part.from_ : part.to]
        else:
            where = self.describe(split)
            records = [(f"{where} row {i}", r) for i, r in enumerate(self.load(split))]
        return records if self.max_docs is None else records[: self.max_docs]

    def conversations(self, split: str) -> list[tuple[str, list[dict[str, str]]]]:
        """(location, messages) per example; a record that does not convert names its place."""
        convert = ROW_FORMATS[self.row_format]
        out = []
        for where, record in self.records(split):
            try:
                out.append((where, convert(record)))
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        return out

    def texts(self, split: str, streaming: bool = False, num_proc: int | None = None) -> Any:
        import datasets

        docs = ["\n".join(m["content"] for m in msgs) for _, msgs in self.conversations(split)]
        return datasets.Dataset.from_dict({"text": docs})

    def fingerprint(self, split: str) -> dict[str, Any]:
        return super().fingerprint(split) | {"row_format": self.row_format, "sft": 1}


class SFTRows(Layout):
    """Chat-rendered (prompt, answer, EOS padding) rows with a `loss_mask` on the answer.

    The tokenizer gets the chat template and role tokens (chat.ensure_chat_template); one
    without a mask token first gets an explicit one at the id MDLM's implicit mask had
    (len(tokenizer)), so a pretrained model's [MASK] row stays the mask and the role tokens
    come after it.
    """

    name: ClassVar[str] = "sft"

    def prepare(self, tokenizer: Any) -> Any:
        if tokenizer.mask_token is None:
            tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
        ensure_chat_template(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"data.tokenizer={tokenizer.name_or_path}: no eos_token to pad with")
        return tokenizer

    def check(self, source: Source, length: int) -> None:
        if not isinstance(source, ChatRecords):
            raise ConfigError(
                "data.layout=SFTRows needs chat records: data.source._target_="
                "diffusion.data.sft.ChatRecords"
            )

    def rows(self, source, split, tokenizer, length, num_proc) -> dict[str, torch.Tensor]:
        where = f"split {split!r} ({source.describe(split)})"
        conversations = source.conversations(split)
        if not conversations:
            raise ConfigError(f"{where} has no examples")
        prompts, answers = [], []
        for loc, messages in conversations:
            prompt = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
            full = encode_chat(tokenizer, messages)
            if full[: len(prompt)] != prompt:
                raise ConfigError(
                    f"{where}, {loc}: the chat template of {tokenizer.name_or_path!r} does not "
                    "render the prompt (with its generation prompt) as the start of the "
                    "conversation, so the answer cannot be told apart"
                )
            prompts.append(prompt)
            answers.append(full[len(prompt) :])
        ids, loss_mask, truncated, dropped = sft_rows(
            prompts, answers, length, tokenizer.eos_token_id
        )
        n = len(prompts)
        if dropped:
            log.warning(
                "%s: dropped %d of %d examples whose prompt alone fills model.length=%d",
                where, dropped, n, length,
            )  # fmt: skip
        if truncated:
            log.warning(
                "%s: truncated %d of %d answers at model.length=%d (they lose their final EOS)",
                where, truncated, n, length,
            )  # fmt: skip
        if len(ids) == 0:
            raise ConfigError(f"{where}: no prompt fits in model.length={length}; raise it")
        return stack_rows(ids, np.ones(ids.shape, dtype=np.int8), loss_mask=loss_mask)
