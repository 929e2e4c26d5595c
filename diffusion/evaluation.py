"""Sample-quality numbers: generative perplexity under a judge LM and sample entropy.

Generative perplexity alone flatters low-temperature samplers, so it is always
reported with the mean per-sample entropy of the token histogram (MDLM/DUO).
The judge is a causal LM loaded once per run by Hugging Face name or local path
(`gpt2-large` for real runs); text is re-tokenised with the judge's tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def sample_entropy(tokens: Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram."""
    entropies = []
    for row in tokens:
        counts = torch.bincount(row.long()).double()
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * p.log()).sum()))
    return sum(entropies) / max(len(entropies), 1)


def judge_windows(tokenizer, texts: Sequence[str], bos: int | None, length: int) -> list[list[int]]:
    """Re-tokenise `texts` with the judge's tokenizer, prefix BOS, cut into windows of `length`
    that overlap by one token (so every token after the first is scored exactly once)."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [bos, *ids] if bos is not None else ids
        for i in range(0, max(len(ids) - 1, 1), length - 1):
            window = ids[i : i + length]
            if len(window) > 1:
                rows.append(window)
    return rows


class JudgeLoadError(RuntimeError):
    """The generative-perplexity judge cannot be loaded."""


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
        self.max_length = int(getattr(self.model.config, "n_positions", 0) or 1024)
        self.bos = self.tokenizer.bos_token_id
        if self.bos is None:
            self.bos = self.tokenizer.eos_token_id

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> dict[str, float]:
        """Generative perplexity of `texts`; each is scored after a BOS token, in windows."""
        nll_sum, n_tokens = 0.0, 0
        rows = judge_windows(self.tokenizer, texts, self.bos, self.max_length)
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
    def score(self, texts: Sequence[str]) -> dict[str, float]:
        rows = judge_windows(self.tokenizer, texts, self.tokenizer.bos_token_id, self.length)
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
