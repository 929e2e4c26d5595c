"""Generative perplexity and sample entropy, checked against slow by-hand computations."""

import math

import pytest
import torch

from diffusion.evaluation import GenPPLJudge, JudgeLoadError, sample_entropy


def test_sample_entropy_by_hand():
    tokens = torch.tensor([[1, 1, 2, 2], [5, 5, 5, 5]])
    # row 0: two tokens at 1/2 each -> log 2; row 1: one token -> 0
    assert sample_entropy(tokens) == pytest.approx(math.log(2) / 2)


def test_low_entropy_rows_by_hand():
    """BD3-LM's check: the last 256 tokens after every block past 256, and at the end."""
    from diffusion.evaluation.judges import low_entropy_rows

    diverse = torch.arange(300)  # every window of 256 distinct ids: log 256 = 5.55 nats
    tail = diverse.clone()
    tail[100:] = 7  # the last window: 56 distinct ids and 200 sevens
    want = 56 / 256 * math.log(256) + 200 / 256 * math.log(256 / 200)  # 1.41 nats
    from diffusion.evaluation.judges import histogram_entropy

    assert histogram_entropy(tail[-256:]) == pytest.approx(want)
    assert low_entropy_rows(torch.stack([diverse, tail]), 4.0).tolist() == [False, True]
    assert low_entropy_rows(torch.stack([tail]), want - 1e-9).tolist() == [False]
    # low only at an earlier block's end: seen block-wise, not at the end alone
    early = torch.arange(600)
    early[:260] = 5  # the prefix ending at 260 has one id in its last 256 tokens
    assert low_entropy_rows(early[None], 4.0).tolist() == [False]
    assert low_entropy_rows(early[None], 4.0, block=4).tolist() == [True]
    assert low_entropy_rows(early[None], 4.0, block=256).tolist() == [False]  # ends 512, 600
    short = torch.tensor([[3] * 8])  # shorter than the window: the whole sample, at the end
    assert low_entropy_rows(short, 0.5).tolist() == [True]
    assert low_entropy_rows(short, 0.5, block=4).tolist() == [False]  # block-wise: unchecked


def test_redraw_replaces_low_rows_counts_their_cost_and_keeps_the_rest():
    from diffusion.evaluation.sampling import Redraw
    from samplers.base import SampleOutput

    low, high = torch.full((8,), 3), torch.arange(8)
    calls = []

    def draw(num_samples: int, rows=(low, high)) -> SampleOutput:
        calls.append(num_samples)
        fresh = rows[len(calls) % 2]  # the first redraw is high, the next low, ...
        return SampleOutput(fresh.repeat(num_samples, 1), nfe=5, rows_evaluated=num_samples)

    redraw = Redraw(below=1.0, window=256, max_redraws=3, block=None)
    batch = torch.stack([high, low, low])
    out, nfe, seqs = redraw(batch, draw)
    assert torch.equal(out, high.repeat(3, 1)) and torch.equal(batch[1], low)  # a copy
    assert (calls, nfe, seqs, redraw.redrawn, redraw.kept_low) == ([2], 5, 2, 2, 0)
    always_low = Redraw(below=1.0, window=256, max_redraws=2, block=None)
    out, nfe, seqs = always_low(low[None], lambda num_samples: SampleOutput(low[None], 4, 1))
    assert (nfe, always_low.redrawn, always_low.kept_low) == (8, 2, 1)
    assert always_low.report() == {
        "redraw_entropy_below": 1.0, "redrawn": 2, "kept_below_entropy": 1,
    }  # fmt: skip


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


def word_tokenizer():
    """A word-level tokenizer with our special tokens (ids 0-3), as a trained one has them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
    vocab = {t: i for i, t in enumerate([*specials, "to", "be", "or", "not"])}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=wl,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        mask_token="[MASK]",
    )


def test_the_judge_never_sees_special_tokens_and_stops_at_the_first_eos(tiny_judge, monkeypatch):
    """Samples read [BOS] to be [EOS] [BOS] or not: MDLM's convention judges 'to be' and then
    the judge's EOS (the sample ended there); without it every word, never a '[BOS]' string."""
    from omegaconf import OmegaConf

    from diffusion.evaluation import judge_texts, sampling

    tok = word_tokenizer()
    bos, eos, pad, to, be, or_, not_ = 1, 2, 0, 4, 5, 6, 7
    tokens = torch.tensor(
        [[bos, to, be, eos, bos, or_, not_, pad], [bos, or_, not_, to, be, or_, not_, to]]
    )
    assert judge_texts(tokens, tok) == (["to be", "or not to be or not to"], [True, False])
    assert judge_texts(tokens, tok, until_eos=False)[0] == [
        "to be or not",
        "or not to be or not to",
    ]

    seen = {}

    class Recorder:
        def score(self, texts, ended=None):
            seen.update(texts=texts, ended=ended)
            return {"gen_ppl": 1.0, "gen_ppl_tokens": 1}

    monkeypatch.setattr(sampling, "build_judge", lambda cfg, device: Recorder())
    dm = type("DM", (), {"tokenizer": tok})()
    cfg = OmegaConf.create({"eval": {"gen_ppl_eval_model_name_or_path": "x"}})
    sampling.judge(cfg, dm, tokens, torch.device("cpu"))
    assert seen["texts"][0] == "to be" and seen["ended"] == [True, False]
    assert not any("[" in t for t in seen["texts"])

    # the judge scores its own EOS after a text that ended: one more token, at its log p
    judge = GenPPLJudge(tiny_judge, batch_size=1)
    plain, ended = judge.score(["to be"]), judge.score(["to be"], [True])
    assert ended["gen_ppl_tokens"] == plain["gen_ppl_tokens"] + 1


def test_the_judge_reads_its_context_from_the_config_key_its_family_uses(tmp_path):
    """GPT-Neo, OPT, Llama and Pythia keep their context in max_position_embeddings: a judge
    read only n_positions, took 1024-token windows and failed deep inside the model on a
    long sample. A config with no context key is a clear error naming the judge key."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    from diffusion.config import ConfigError
    from diffusion.evaluation.judges import judge_context

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["to be or not to be that is the question"] * 50,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=len(tok), max_position_embeddings=32, hidden_size=32, num_layers=1,
        num_heads=2, attention_types=[[["global"], 1]], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPTNeoForCausalLM(config).save_pretrained(tmp_path)
    judge = GenPPLJudge(str(tmp_path))
    assert judge.max_length == 32
    text = "to be or not to be that is the question " * 20
    assert len(tok(text, add_special_tokens=False)["input_ids"]) > 32
    assert math.isfinite(judge.score([text])["gen_ppl"])

    class NoContext:
        hidden_size = 32

    with pytest.raises(ConfigError, match="eval.gen_ppl_eval_model_name_or_path='x'"):
        judge_context(NoContext(), "x")


def test_sample_eval_redraws_low_entropy_samples_and_says_so(tiny_lm, tmp_path):
    """eval.redraw_entropy_below above any reachable entropy: every sample is redrawn
    max_redraws times, then kept and counted; the redraws' network calls are in nfe."""
    import json

    off = ["eval.compute_generative_perplexity=false"]
    tiny_lm.evaluate(tmp_path / "plain", "sample_eval", *off)
    tiny_lm.evaluate(
        tmp_path / "redraw", "sample_eval", *off,
        "eval.redraw_entropy_below=100", "eval.max_redraws=1",
    )  # fmt: skip
    plain = json.loads((tmp_path / "plain" / "sample_eval.json").read_text())
    report = json.loads((tmp_path / "redraw" / "sample_eval.json").read_text())
    n = report["num_samples"]
    assert (report["redrawn"], report["kept_below_entropy"]) == (n, n)
    assert report["nfe"] > plain["nfe"] and "redrawn" not in plain


def test_redraw_checks_each_model_where_bd3lms_loop_does():
    """Block models after every block, AR after every token, the rest at the end."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from diffusion.evaluation.sampling import Redraw
    from diffusion.noise import LogLinear
    from diffusion.objectives.ar import AR
    from diffusion.objectives.bd3lm import BD3LM
    from diffusion.objectives.subs import SUBS

    keys = {"redraw_entropy_below": 4.0, "redraw_window": 256, "max_redraws": 10}
    cfg = OmegaConf.create({"eval": keys})
    block = {
        "ar": AR(9, 10),
        "bd3lm": BD3LM(LogLinear(), 9, 10, block_size=4),
        "subs": SUBS(LogLinear(), 9, 10),
    }
    got = {k: Redraw.from_config(cfg, SimpleNamespace(objective=o)).block for k, o in block.items()}
    assert got == {"ar": 1, "bd3lm": 4, "subs": None}
    off = OmegaConf.create({"eval": {**keys, "redraw_entropy_below": None}})
    assert Redraw.from_config(off, SimpleNamespace(objective=block["subs"])) is None
