"""Generative perplexity and sample entropy, checked against slow by-hand computations."""

import math

import pytest
import torch

from diffusion.evaluation import GenPPLJudge, JudgeLoadError, sample_entropy


def test_sample_entropy_by_hand():
    tokens = torch.tensor([[1, 1, 2, 2], [5, 5, 5, 5]])
    # row 0: two tokens at 1/2 each -> log 2; row 1: one token -> 0
    assert sample_entropy(tokens) == pytest.approx(math.log(2) / 2)


def test_gen_ppl_matches_a_direct_computation(tiny_judge):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["to be or not", "all the world's a stage to be"]
    judge = GenPPLJudge(tiny_judge, batch_size=1)
    got = judge.score(texts)
    tok = AutoTokenizer.from_pretrained(tiny_judge)
    model = AutoModelForCausalLM.from_pretrained(tiny_judge).eval()
    nll, n = 0.0, 0
    for text in texts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for i in range(1, len(ids)):  # every token after BOS, one at a time
            nll -= float(logits[i - 1].log_softmax(-1)[ids[i]])
            n += 1
    assert got["gen_ppl_tokens"] == n
    assert got["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # batching with padding does not change the figure
    assert GenPPLJudge(tiny_judge, batch_size=2).score(texts)["gen_ppl"] == pytest.approx(
        got["gen_ppl"], rel=1e-4
    )


def test_missing_judge_is_a_clear_error(tmp_path):
    with pytest.raises(JudgeLoadError, match="gen_ppl_eval_model_name_or_path"):
        GenPPLJudge(str(tmp_path / "no_such_model"))
