"""Scale-out: training noise independent of how the global batch is split, and a 2-process
gloo DDP run through main.py whose gradients match a 1-process run at the same global batch."""

import pytest
import torch

from diffusion.noise import LogLinear
from diffusion.objectives.subs import SUBS
from tests.test_main_e2e import run_main


class Recorder(torch.nn.Module):
    """A backbone that remembers its input x_t and returns fixed logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, sigma=None, attention_mask=None):
        self.seen.append(x_t.clone())
        return torch.zeros(*x_t.shape, self.vocab)


def test_global_rows_draw_the_same_noise_as_the_whole_batch():
    """Rows (1, 3) of a global batch of 4 get exactly the t and mask they get in the whole
    batch: stratification and masks are over the global batch, not the micro-batch."""
    obj = SUBS(LogLinear(), mask_id=4, vocab_size=5)
    x0 = torch.randint(0, 4, (4, 64))
    whole, part = Recorder(5), Recorder(5)
    out_w = obj.loss(whole, x0, torch.ones_like(x0), torch.Generator().manual_seed(3))
    idx = torch.tensor([1, 3])
    out_p = obj.loss(
        part, x0[idx], torch.ones(2, 64), torch.Generator().manual_seed(3), rows=(idx, 4)
    )
    assert torch.equal(part.seen[0], whole.seen[0][idx])
    assert torch.allclose(out_p.nll, out_w.nll[idx])
    # the 4 times fall one per quarter of [eps, 1]: masked fractions increase with the row
    t = obj.sample_t(4, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.all((t[1:] - t[:-1]) > 0) and t[0] < 0.25 + 1e-3 and t[3] > 0.75


def test_loss_mask_keeps_prompt_clean_and_sequence_norm_by_hand():
    obj = SUBS(LogLinear(), mask_id=4, vocab_size=5)
    x0 = torch.randint(0, 4, (3, 16))
    loss_mask = torch.zeros(3, 16)
    loss_mask[:, 10:] = 1  # the answer: positions 10..15
    loss_mask[2, 5:] = 1  # a longer answer in row 2
    rec = Recorder(5)
    for seed in range(20):
        out = obj.loss(rec, x0, torch.ones_like(x0), torch.Generator().manual_seed(seed), loss_mask)
        x_t = rec.seen[-1]
        assert torch.equal(x_t[loss_mask == 0], x0[loss_mask == 0])  # prompt never masked
        assert torch.equal(out.mask, loss_mask)
    nll = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    from diffusion.objectives.base import LossOutput

    out = LossOutput(nll, mask)
    assert out.reduce("token").item() == pytest.approx(10.0 / 5.0)
    assert out.reduce("sequence").item() == pytest.approx((4.0 / 2 + 6.0 / 3) / 2)
    with pytest.raises(ValueError, match="training.loss_norm"):
        out.reduce("batch")


def _weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}


@pytest.mark.slow  # heavy end to end (CI's second tier): keeps the default tier under 10 min
def test_two_process_ddp_gradients_match_one_process(tmp_path):
    """One SGD step (lr 1, no clipping) moves the weights by minus the gradient; 2 gloo
    processes with 2 rows each must move them as 1 process with 4 rows does."""
    common = [
        "optim=sgd",
        "optim.lr=1.0",
        "trainer.gradient_clip_val=null",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu",
        "training.ema=0",
        "lr_scheduler.num_warmup_steps=0",
        "eval.samples_after_train=0",
        "eval.max_batches=1",
        "checkpointing.every_n_train_steps=1",
        "loader.global_batch_size=4",
        "checkpointing.resume_from_ckpt=false",
    ]
    run_main(tmp_path / "one", *common, "trainer.devices=1")
    run_main(tmp_path / "two", *common, "trainer.devices=2", "strategy=ddp")
    run_main(tmp_path / "init", *common, "trainer.devices=1", "optim.lr=0.0")  # w0
    one, two, init = (
        _weights(tmp_path / "one"),
        _weights(tmp_path / "two"),
        _weights(tmp_path / "init"),
    )
    moved = 0.0
    for name in init:
        grad_one, grad_two = init[name] - one[name], init[name] - two[name]
        torch.testing.assert_close(grad_two, grad_one, rtol=1e-4, atol=1e-6, msg=name)
        moved += grad_one.abs().sum().item()
    assert moved > 0  # the step did something


def test_stochastic_length_crops_a_fraction_of_steps_the_same_on_every_rank():
    """random_length_fraction: that share of optimizer steps trains on a random prefix
    length in [2, L]; the draw comes from the (seed, step) generator, so every rank and
    micro-batch of a step crops alike, and a rerun crops the same steps."""
    from diffusion.module import DiffusionModule

    def module(fraction: float) -> DiffusionModule:
        rec = Recorder(5)
        obj = SUBS(LogLinear(), mask_id=4, vocab_size=5)
        return DiffusionModule(
            rec, obj, optimizer=torch.optim.SGD, ema_decay=0, random_length_fraction=fraction
        )

    L = 64
    lengths = {}
    for fraction in (0.0, 0.25, 1.0):
        m = module(fraction)
        got = []
        for step in range(200):
            got.append(m.crop_length(L, torch.Generator().manual_seed(step)))
        lengths[fraction] = got
    assert lengths[0.0] == [L] * 200
    assert all(2 <= n <= L for n in lengths[1.0])
    assert len(set(lengths[1.0])) > 20  # spread over the range
    cropped = sum(n < L for n in lengths[0.25]) / 200
    assert 0.15 < cropped < 0.35
    # in training_step: the backbone sees the cropped rows, and the same step crops the same
    m = module(1.0)
    batch = {"input_ids": torch.randint(0, 4, (2, L)), "attention_mask": torch.ones(2, L)}
    m.training_step(batch, 0)
    m.training_step(batch, 0)
    first, again = m.backbone.seen
    assert first.shape[1] < L and torch.equal(first, again)
    with pytest.raises(ValueError, match="training.random_length_fraction"):
        module(1.5)


class _Shard(torch.utils.data.IterableDataset):
    """A rank's stream: `n` rows of the rank's own value; records its epochs."""

    def __init__(self, n: int, value: int) -> None:
        self.n, self.value, self.epochs = n, value, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        for _ in range(self.n):
            yield torch.tensor([self.value])


def _stream_rank(rank: int, init: str, out: str) -> None:
    from diffusion.data.loading import EpochStreamLoader

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        loader = EpochStreamLoader(_Shard(n=7 if rank == 0 else 4, value=rank), batch_size=2)
        counts = [len(list(loader)) for _ in range(2)]  # two epochs
        torch.save({"counts": counts, "state": loader.state_dict()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_streamed_shards_of_unequal_length_end_their_epoch_together(tmp_path):
    """Rank 0 streams 7 rows (4 batches of 2), rank 1 4 rows (2 batches): without agreement
    rank 0 took 2 more optimizer steps than rank 1, whose gradient all-reduce then hung. Every
    rank now serves 2 batches per epoch, and the epochs advance together."""
    init = f"file://{tmp_path / 'init'}"
    torch.multiprocessing.spawn(_stream_rank, args=(init, str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert got["counts"] == [2, 2], rank
        assert got["state"] == {"epoch": 2, "batches": 0}
