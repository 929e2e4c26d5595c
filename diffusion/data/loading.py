"""Loading order: a resumable, rank-sharded, (seed, epoch)-shuffled sampler and loader, and
the dataset of cached token rows.

Lightning stores the train loader's `state_dict` in checkpoints, so a resumed run sees exactly
the batches of an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Row order for one rank: shuffled by (seed, epoch), sharded `rank::world_size`.

    Lightning calls `set_epoch`; `start` skips rows of this rank's shard (set by the loader on
    resume). With `drop_last` every rank gets the same count, which DDP needs for training.

    `crop_span` (random-crop training, `data.crop_train`): every row comes with an offset in
    [0, crop_span), yielded as `(row, offset)` for `CroppedRows`. The offsets are one draw per
    row and epoch from (seed, epoch), so they do not depend on the order, the rank count or
    where a resumed run starts: a resumed run crops every row as the uninterrupted one did.
    """

    def __init__(
        self,
        num_rows: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int | None = None,
        world_size: int | None = None,
        crop_span: int | None = None,
    ) -> None:
        self.num_rows, self.shuffle, self.seed, self.drop_last = num_rows, shuffle, seed, drop_last
        self.crop_span = crop_span
        self._rank, self._world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    # read when used, not when built: `mode=ppl_eval` builds its loader before the trainer
    # starts the process group, and a shard fixed then was the whole split on every rank
    @property
    def rank(self) -> int:
        return dist_info()[0] if self._rank is None else self._rank

    @property
    def world_size(self) -> int:
        return dist_info()[1] if self._world_size is None else self._world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        usable = (
            self.num_rows - self.num_rows % self.world_size if self.drop_last else self.num_rows
        )
        return len(range(self.rank, usable, self.world_size))

    def indices(self) -> torch.Tensor:
        """This rank's rows for the current epoch, in order."""
        if self.shuffle:
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.num_rows)
        if self.drop_last:
            order = order[: self.num_rows - self.num_rows % self.world_size]
        return order[self.rank :: self.world_size]

    def offsets(self) -> torch.Tensor:
        """(num_rows,) crop offsets of the current epoch, indexed by row (`crop_span` set)."""
        seed = int(np.random.SeedSequence([self.seed, self.epoch, 1]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.crop_span, (self.num_rows,), generator=gen)

    def __iter__(self) -> Iterator[Any]:
        start, self.start = self.start, 0
        rows = self.indices()[start:]
        if self.crop_span is None:
            yield from rows.tolist()
        else:
            yield from zip(rows.tolist(), self.offsets()[rows].tolist(), strict=True)


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning checkpoints: `state_dict` = (epoch, rows served this epoch).

    Lightning 2.6 stores the state of every train loader that has `state_dict` and
    `load_state_dict` (fit_loop.on_save_checkpoint) and restores it before the first `iter`;
    the next epoch pass then skips the rows already trained on, so a resumed run sees the
    same batches as an uninterrupted one. The position is kept in rows of this rank's shard,
    not batches, so a resume with a deliberately changed batch size (`checkpointing.
    allow_changed`) starts at the first untrained row. Counting happens where batches leave
    the loader, so worker prefetching does not shift it.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, sampler: ResumableSampler, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._rows = 0
        self._resume: dict[str, int] | None = None

    def _epoch_done(self) -> bool:
        """True once no further batch can be drawn from this epoch's rows."""
        left = len(self.sampler) - self._rows
        return left <= 0 or (self.drop_last and left < self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        skip = 0
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            skip = self._resume["rows"]
        self._resume = None
        sampler.start = skip
        self._rows = skip
        for batch in super().__iter__():
            self._rows = min(self._rows + self.batch_size, len(sampler))
            yield batch
        sampler.set_epoch(sampler.epoch + 1)  # a plain loop gets a fresh order next pass
        self._rows = 0

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler
        if self._epoch_done():  # the epoch is complete: resume at the next one
            return {"epoch": sampler.epoch + 1, "rows": 0, "world_size": sampler.world_size}
        return {"epoch": sampler.epoch, "rows": self._rows, "world_size": sampler.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        sampler: ResumableSampler = self.sampler
        if state.get("world_size", sampler.world_size) != sampler.world_size:
            log.warning(
                "resuming the data order with world size %d (saved with %d): the rest of this "
                "epoch will not match the interrupted run",
                sampler.world_size,
                state["world_size"],
            )
        if "rows" in state:
            rows = int(state["rows"])
        else:  # checkpoints before the position was kept in rows counted batches
            rows = int(state["batches"]) * self.batch_size
        self._resume = {"epoch": int(state["epoch"]), "rows": rows}
        sampler.set_epoch(int(state["epoch"]))


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank (one scalar all-reduce; `flag` itself on one process)."""
    _, world = dist_info()
    if world == 1:
        return flag
    dist = torch.distributed
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class EpochStreamLoader(torch.utils.data.DataLoader):
    """A DataLoader over a streamed dataset that reshuffles it at every epoch.

    Lightning sets the epoch only on a loader's sampler, and a loader over an
    `IterableDataset` has none, so the stream would replay one order every epoch. This
    loader calls the dataset's `set_epoch` at each pass and checkpoints the epoch (Lightning
    stores `state_dict`), so a resumed run streams that epoch's order again; the rows
    already trained on in it are streamed again too (a stream cannot seek).

    Under DDP the ranks' shards of a stream differ in length (`split_dataset_by_node` hands
    out whole files or every world-th row), and a rank that ran out while another still
    stepped would hang the gradient all-reduce: every batch is served only when every rank
    has one (one scalar all-reduce per batch), so an epoch ends on all ranks at the shortest
    shard's count, the surplus rows of the longer shards unused that epoch (logged).
    """

    def __init__(self, dataset: torch.utils.data.IterableDataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch = 0
        self._served = 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.set_epoch(self._epoch)
        self._served = 0
        batches = super().__iter__()
        while True:
            batch = next(batches, None)
            if not all_ranks(batch is not None):
                break
            self._served += 1
            yield batch
        if batch is not None:
            log.info(
                "epoch %d of the stream ends at %d batches, another rank's shard being shorter "
                "(the rest of this rank's shard is unused this epoch)",
                self._epoch,
                self._served,
            )
        self._epoch += 1
        self._served = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._epoch = int(state["epoch"])
        if int(state.get("batches", 0)):
            log.warning(
                "resuming a streamed corpus mid-epoch: epoch %d restarts from its first row "
                "(%d batches of it were trained on before)",
                self._epoch,
                int(state["batches"]),
            )


class TokenDataset(torch.utils.data.Dataset):
    """Rows of cached token tensors -> `{"input_ids", "attention_mask"}` long tensors.

    SFT rows carry a `loss_mask` too (bool: the answer and its EOS padding, the only tokens
    noised and scored); it is added to every item when present.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
    ) -> None:
        self.input_ids, self.attention_mask, self.loss_mask = input_ids, attention_mask, loss_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "input_ids": self.input_ids[i].long(),
            "attention_mask": self.attention_mask[i].long(),
        }
        if self.loss_mask is not None:
            item["loss_mask"] = self.loss_mask[i].bool()
        return item

    def scored(self) -> torch.Tensor:
        """(N, L) bool: the tokens a loss counts (real tokens; for SFT only the answers)."""
        mask = self.attention_mask.bool()
        return mask if self.loss_mask is None else mask & self.loss_mask.bool()


class CroppedRows(torch.utils.data.Dataset):
    """Random-crop training (MDLM's text8-crop): rows of 2L cached tokens served as L-token
    windows, the window of key `(row, offset)` being tokens [offset, offset + L) with its first
    token set to `bos` (MDLM: every row then starts as a validation row does). The offsets come
    from the sampler (`ResumableSampler(crop_span=...)`), one per row and epoch.
    """

    def __init__(self, rows: TokenDataset, length: int, bos: int | None) -> None:
        if rows.loss_mask is not None:
            raise ValueError("CroppedRows: rows with a loss_mask (SFT) are not cropped")
        self.rows, self.length, self.bos = rows, int(length), bos

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        row, offset = key
        window = slice(offset, offset + self.length)
        ids = self.rows.input_ids[row, window].to(torch.long, copy=True)  # never the cache
        if self.bos is not None:
            ids[0] = self.bos
        return {"input_ids": ids, "attention_mask": self.rows.attention_mask[row, window].long()}
