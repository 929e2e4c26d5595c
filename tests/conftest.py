"""Test settings: offline, few threads, and the `gpu` marker skipping cleanly on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory):
    """A tiny GPT-2 and its BPE tokenizer saved to a folder: a stand-in for `gpt2-large`,
    loaded by path through the same `from_pretrained` code path a hub name takes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["to be or not to be that is the question", "all the world's a stage"] * 50
    bpe.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The one tiny trained model of the test run (tests/tiny_lm.py): a character MDLM that
    learned one sentence, trained in process once; tests evaluate, sample and convert it."""
    from tests.tiny_lm import train_tiny_lm

    return train_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
