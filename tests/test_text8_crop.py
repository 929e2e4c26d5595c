"""data=text8_crop: MDLM's text8-crop. Train is cut into pieces of 4 x L characters and
wrapped into MDLM's rows of 2L tokens; every epoch each row is served as one window of L tokens
at an offset in [0, L), its first token set to [BOS]; validation and test are text8's L rows.

The windows are checked against the cached 2L rows with plain slicing, and the rows against
tests/test_text8_rows.py's independent MDLM reference."""

from __future__ import annotations

import os
import random
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diffusion.data.base import ConfigError  # noqa: E402
from diffusion.data.loading import ResumableSampler  # noqa: E402
from diffusion.data.sources import HFDataset  # noqa: E402
from tests.test_dataloader import RUNTIME, compose_data  # noqa: E402
from tests.test_text8_rows import ALPHABET, mdlm_text8_rows  # noqa: E402

L = 12


def crop_dm(tmp_path, text: str, length: int = L, **data):
    """configs/data/text8_crop.yaml on a local file of `text` (train = validation = test)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "text8.txt"
    path.write_text(text)
    cfg = compose_data("text8_crop")
    cfg.cache_dir = str(tmp_path / "cache")
    OmegaConf.update(cfg, "source.data_files", {"train": str(path)}, merge=False)
    ranges = {"train": [0, len(text)], "validation": [0, len(text)], "test": [0, None]}
    OmegaConf.update(cfg, "source.char_ranges", ranges, merge=False)
    chunks = {"train": 4 * length, "validation": length, "test": length}
    OmegaConf.update(cfg, "source.chunk_chars", chunks, merge=False)
    for key, value in data.items():
        OmegaConf.update(cfg, key, value, merge=False)
    dm = instantiate(cfg, length=length, **RUNTIME)
    dm.setup()
    return dm


def random_text(seed: int, n: int = 4 * L * 40 + 7) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def windows(loader) -> list[list[int]]:
    return [row for batch in loader for row in batch["input_ids"].tolist()]


def test_the_config_is_mdlms_text8_crop():
    cfg = compose_data("text8_crop")
    assert cfg.crop_train is True and cfg.name == "text8_crop"
    assert dict(cfg.source.chunk_chars) == {"train": 1024, "validation": 256, "test": 256}
    assert cfg.layout._target_.endswith("layouts.MDLMWrap") and cfg.layout.group_size == 1000
    assert cfg.source.char_ranges.train == [0, 90000000]  # text8's splits, inherited


def test_rows_are_mdlms_train_2l_and_eval_l(tmp_path):
    text = random_text(0)
    dm = crop_dm(tmp_path, text)
    tok = dm.setup_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in ALPHABET}
    bos, eos = tok.bos_token_id, tok.eos_token_id
    train = mdlm_text8_rows(text, ids, bos, eos, 4 * L, 2 * L, 1000)
    evaluation = mdlm_text8_rows(text, ids, bos, eos, L, L, 1000)
    assert dm.dataset("train").input_ids.tolist() == train
    assert dm.dataset("validation").input_ids.tolist() == evaluation
    assert "train-L24-" in dm._cache_path("train") and "test-L12-" in dm._cache_path("test")


def test_windows_are_l_tokens_of_a_row_at_an_offset_below_l_starting_with_bos(tmp_path):
    dm = crop_dm(tmp_path, random_text(1))
    bos = dm.setup_tokenizer().bos_token_id
    rows = dm.dataset("train").input_ids.tolist()
    loader = dm.train_dataloader()
    served = windows(loader)
    assert len(served) == len(rows) // RUNTIME["batch_size"] * RUNTIME["batch_size"]
    found: Counter[int] = Counter()
    offsets = set()
    for w in served:
        assert len(w) == L and w[0] == bos
        hits = [
            (r, o) for r, row in enumerate(rows) for o in range(L) if row[o + 1 : o + L] == w[1:]
        ]
        assert len(hits) == 1, w  # random text: each window is one place in one row
        found[hits[0][0]] += 1
        offsets.add(hits[0][1])
    assert max(found.values()) == 1  # every row at most once per epoch
    assert len(offsets) > L // 2  # offsets spread over [0, L), not one fixed crop
    assert sorted(offsets)[-1] < L  # never past 2L - 1: a window never reaches the last EOS
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].shape == (RUNTIME["batch_size"], L)
    assert dm.dataset("train").input_ids[:, 0].eq(bos).all()  # the cache was not written to


def test_every_epoch_draws_new_offsets_and_a_resumed_loader_serves_the_same_windows(tmp_path):
    dm = crop_dm(tmp_path, random_text(2))
    loader = dm.train_dataloader()
    first, second = windows(loader), windows(loader)
    assert first != second and sorted(first) != sorted(second)  # new order and new windows
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)["input_ids"].tolist() for _ in range(3)]
    state = loader.state_dict()
    rest = [b["input_ids"].tolist() for b in it]
    again = crop_dm(tmp_path, random_text(2)).train_dataloader()
    again.load_state_dict(state)
    assert [b["input_ids"].tolist() for b in again] == rest
    assert sum(head + rest, []) == first


def test_offsets_do_not_depend_on_the_rank_count():
    one = ResumableSampler(50, shuffle=True, seed=3, drop_last=True, rank=0, world_size=1,
                           crop_span=L)  # fmt: skip
    by_row = dict(iter(one))
    for rank in range(2):
        two = ResumableSampler(50, shuffle=True, seed=3, drop_last=True, rank=rank,
                               world_size=2, crop_span=L)  # fmt: skip
        assert all(by_row[r] == o for r, o in two)
    assert set(by_row.values()) <= set(range(L))
    one.set_epoch(1)
    assert dict(iter(one)) != by_row


def test_the_uncropped_twin_serves_other_windows(tmp_path):
    """The negative twin: text8 rows of L from 4L pieces, no crop, are not the crop's windows."""
    text = random_text(4)
    crop = windows(crop_dm(tmp_path / "a", text).train_dataloader())
    plain = crop_dm(tmp_path / "b", text, crop_train=False).train_dataloader()
    assert sorted(windows(plain)) != sorted(crop)


def test_bad_crop_settings_are_named(tmp_path):
    text = random_text(5)
    with pytest.raises(InstantiationException, match=r"data.crop_train=true.*pad layout"):
        crop_dm(tmp_path, text, layout={"_target_": "diffusion.data.layouts.Pad"})
    dm = crop_dm(tmp_path, text)
    with pytest.raises(ConfigError, match=r"crop_train=true: its train rows are 24 tokens"):
        dm.dataloader("train", for_eval=True)
    with pytest.raises(ConfigError, match=r"chunk_chars: \['dev'\] are not splits"):
        HFDataset(path="text", chunk_chars={"dev": 4})
    with pytest.raises(ConfigError, match=r"data.source.chunk_chars.train=0 must be >= 1"):
        HFDataset(path="text", chunk_chars={"train": 0})
    assert HFDataset(path="text", chunk_chars={"train": 8}).chunk_for("validation") is None


def test_a_scalar_chunk_keeps_its_cache_key():
    """chunk_chars: 256 must fingerprint as before the per-split form (cached rows stay valid)."""
    a = HFDataset(path="text", splits={"train": "train"}, chunk_chars=256)
    b = HFDataset(path="text", splits={"train": "train"}, chunk_chars={"train": 256})
    assert a.fingerprint("train")["chunk_chars"] == 256 == b.fingerprint("train")["chunk_chars"]


def test_training_on_text8_crop_runs_end_to_end(tmp_path):
    from tests.tiny_lm import main_in_process

    path = tmp_path / "text8.txt"
    path.write_text(random_text(6, 4 * 16 * 30))
    n = len(path.read_text())
    main_in_process(
        tmp_path / "run",
        "debug=tiny_cpu",
        "data=text8_crop",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.source.data_files={{train: {path}}}",
        f"data.source.char_ranges={{train: [0, {n}], validation: [0, {n}], test: [0, null]}}",
        "data.source.chunk_chars={train: 64, validation: 16, test: 16}",
        "model.length=16",
        "trainer.max_steps=2",
    )
    cached = sorted(
        p.name.split("-")[0] + p.name.split("-")[1]
        for p in (tmp_path / "cache" / "text8_crop").glob("*.pt")
    )
    assert cached == ["testL16", "trainL32", "validationL16"]
    assert list((tmp_path / "run").rglob("*.ckpt"))
