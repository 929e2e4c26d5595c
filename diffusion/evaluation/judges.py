"""Sample-quality numbers: generative perplexity under a judge LM and sample entropy.

Generative perplexity alone flatters low-temperature samplers, so it is always
reported with the mean per-sample entropy of the token histogram (MDLM/DUO).
The judge is a causal LM loaded once per run by Hugging Face name or local path
(`gpt2-large` for real runs), or an AR checkpoint of ours; text is re-tokenised with the
judge's tokenizer.

What the judge sees (`judge_texts`): each sample's tokens with our special tokens removed
(they are not text: decoded they read '[BOS]to be[EOS]...'), and with MDLM's EOS convention
(`eval.gen_ppl_until_eos=true`, the default) only the text up to the first EOS, which the
judge then scores as its own EOS token: the sample ends there. `false` judges every
non-special token of the sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion.data.tokenizers import encode_text


def histogram_entropy(row: Tensor) -> float:
    """Entropy (nats) of the token histogram of one sequence (or window) of ids."""
    counts = torch.bincount(row.long()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def sample_entropy(tokens: Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram."""
    entropies = [histogram_entropy(row) for row in tokens]
    return sum(entropies) / max(len(entropies), 1)


def low_entropy_rows(
    tokens: Tensor, below: float, window: int = 256, block: int | None = None
) -> Tensor:
    """(B,) bool: the samples BD3-LM's sampling loop redraws: the entropy (nats, of the token
    histogram) of the last `window` tokens below `below` (its 4.0) at a check. A block-wise
    model (`block`: its block size) is checked after every block once the sample is longer
    than `window` (a shorter one never); any other at the end, on at most `window` tokens."""
    n = tokens.shape[1]
    ends = [e for e in (*range(block, n, block), n) if e > window] if block else [n]
    return torch.tensor(
        [
            any(histogram_entropy(row[max(e - window, 0) : e]) < below for e in ends)
            for row in tokens
        ],
        dtype=torch.bool,
    )


def judge_texts(
    tokens: Tensor, tokenizer: Any, until_eos: bool = True
) -> tuple[list[str], list[bool]]:
    """(texts, ended): what the judge scores of each sample row (B, L) of our ids.

    Leading BOS tokens are skipped (GPT-2's BOS is its EOS); with `until_eos` the row is cut
    at the first EOS after them and `ended` says one was there; every special token of the
    tokenizer (BOS, EOS, PAD, MASK, ...) is then dropped, and the rest decoded.
    """
    special = set(tokenizer.all_special_ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if tokenizer.mask_token_id is None:
        special.add(len(tokenizer))  # MDLM's [MASK] appended after the vocabulary
    texts, ended = [], []
    for row in tokens.tolist():
        start = 0
        while start < len(row) and row[start] == bos:
            start += 1
        row = row[start:]
        cut = until_eos and eos is not None and eos in row
        if cut:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode([t for t in row if t not in special]))
        ended.append(cut)
    return texts, ended


def judge_windows(
    tokenizer,
    texts: Sequence[str],
    bos: int | None,
    length: int,
    eos: int | None = None,
    ended: Sequence[bool] | None = None,
) -> list[list[int]]:
    """Re-tokenise `texts` with the judge's tokenizer, prefix BOS, append the judge's `eos`
    to the texts that `ended`, and cut into windows of `length` that overlap by one token
    (so every token after the first is scored exactly once)."""
    rows = []
    for i, text in enumerate(texts):
        (ids,) = encode_text(tokenizer, [text])  # sample text never parses as special ids
        ids = [bos, *ids] if bos is not None else ids
        if ended is not None and ended[i] and eos is not None:
            ids = [*ids, eos]
        for j in range(0, max(len(ids) - 1, 1), length - 1):
            window = ids[j : j + length]
            if len(window) > 1:
                rows.append(window)
    return rows


class JudgeLoadError(RuntimeError):
    """The generative-perplexity judge cannot be loaded."""


CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_seq_len")


def judge_context(config: Any, name: str) -> int:
    """The judge's context length, its windows' size: the first of CONTEXT_KEYS its config
    sets (GPT-2: n_positions; GPT-Neo, OPT, Llama, Pythia: max_position_embeddings)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    from diffusion.config import ConfigError

    raise ConfigError(
        f"eval.gen_ppl_eval_model_name_or_path={name!r}: its config sets none of "
        f"{', '.join(CONTEXT_KEYS)}, so its context length (the scoring window) is unknown"
    )


class GenPPLJudge:
    """Scores texts with a causal LM: exp(total NLL / total judged tokens)."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path).to(device).eval()
        except (OSError, ValueError) as e:
            raise JudgeLoadError(
                f"eval.gen_ppl_eval_model_name_or_path={name_or_path!r} could not be loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0]}). Offline, point it to a local "
                "folder, or set eval.compute_generative_perplexity=false"
            ) from e
        self.device = device
        self.batch_size = batch_size
        self.max_length = judge_context(self.model.config, name_or_path)
        self.eos = self.tokenizer.eos_token_id
        self.bos = self.tokenizer.bos_token_id
        if self.bos is None:
            self.bos = self.eos

    @torch.no_grad()
    def score(self, texts: Sequence[str], ended: Sequence[bool] | None = None) -> dict[str, float]:
        """Generative perplexity of `texts`; each is scored after a BOS token, in windows, with
        the judge's EOS scored after the texts that `ended`."""
        nll_sum, n_tokens = 0.0, 0
        rows = judge_windows(self.tokenizer, texts, self.bos, self.max_length, self.eos, ended)
        for i in range(0, len(rows), self.batch_size):
            batch = rows[i : i + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            for j, r in enumerate(batch):
                ids[j, : len(r)] = torch.tensor(r)
                attn[j, : len(r)] = 1
            ids, attn = ids.to(self.device), attn.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            m = attn[:, 1:].double()
            nll_sum += float(-(logp.double() * m).sum())
            n_tokens += int(m.sum())
        ppl = math.exp(nll_sum / n_tokens) if n_tokens else float("nan")
        return {"gen_ppl": ppl, "gen_ppl_tokens": n_tokens}


class ModelJudge:
    """An AR checkpoint of ours as the judge: the offline stand-in for `gpt2-large`.

    Texts are re-tokenised with the judge's own tokenizer, prefixed with BOS, cut into windows
    of the judge's training length and scored with its exact next-token loss.
    """

    def __init__(self, backbone, objective, tokenizer, length: int, batch_size: int = 8):
        self.backbone = backbone.eval()
        self.objective = objective
        self.tokenizer = tokenizer
        self.length = length
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, texts: Sequence[str], ended: Sequence[bool] | None = None) -> dict[str, float]:
        tok = self.tokenizer
        rows = judge_windows(tok, texts, tok.bos_token_id, self.length, tok.eos_token_id, ended)
        device = next(self.backbone.parameters()).device
        nll_sum, n_tokens = 0.0, 0
        for i in range(0, len(rows), self.batch_size):
            batch = rows[i : i + self.batch_size]
            ids = torch.zeros(len(batch), self.length, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, r in enumerate(batch):
                ids[j, : len(r)] = torch.tensor(r)
                attn[j, : len(r)] = 1
            out = self.objective.loss(self.backbone, ids.to(device), attn.to(device))
            nll_sum += float((out.nll.double() * out.mask.double()).sum())
            n_tokens += int(out.mask.sum())
        ppl = math.exp(nll_sum / n_tokens) if n_tokens else float("nan")
        return {"gen_ppl": ppl, "gen_ppl_tokens": n_tokens}


def is_release_folder(name: str) -> bool:
    """A local folder in one of models.formats' published layouts (DiffuGPT's wrapped GPT-2,
    MDLM's DiT, ...): AutoModelForCausalLM would load it half-initialised without an error, so
    such a judge goes through module_from_checkpoint (converted, then checked for being AR)."""
    from pathlib import Path

    from models.formats import FormatError, detect_format

    path = Path(name).expanduser()
    if not path.is_dir():
        return False
    try:
        detect_format(path)
    except FormatError:  # a plain Hugging Face folder: transformers loads it
        return False
    return True


def build_judge(cfg: Any, device: torch.device) -> GenPPLJudge | ModelJudge:
    """The generative-perplexity judge: a Hugging Face causal LM, or an AR checkpoint of ours."""
    from diffusion.build import module_from_checkpoint
    from diffusion.config import ConfigError

    name = str(cfg.eval.gen_ppl_eval_model_name_or_path)
    if not name.endswith(".ckpt") and not is_release_folder(name):
        return GenPPLJudge(name, device=device, batch_size=cfg.eval.gen_ppl_batch_size)
    saved, judge_dm, judge = module_from_checkpoint(name, "eval.gen_ppl_eval_model_name_or_path")
    if not judge.objective.exact_likelihood:
        raise ConfigError(
            f"eval.gen_ppl_eval_model_name_or_path={name} is not an AR checkpoint: a judge must "
            "give exact likelihoods (train one with experiment=ar_shakespeare)"
        )
    return ModelJudge(
        judge.eval_backbone.to(device),
        judge.objective,
        judge_dm.tokenizer,
        length=int(saved.model.length),
        batch_size=cfg.eval.gen_ppl_batch_size,
    )
