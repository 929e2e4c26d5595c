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
