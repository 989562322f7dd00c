"""Data without downloads for torchtitan runs: fla_cp's byte tokenizer and packer as torchtitan components.

`ByteTokenizer` is `fla_cp.data.ByteTokenizer` (bytes 0..255, EOS 256) as a torchtitan tokenizer.
`PackedTextDataLoader` packs a local corpus (`--dataloader.dataset_path`: a file or directory of
.txt/.md/.py/.rst/.jsonl; empty: the Python standard library's sources) into sequences of `seq_len`, as
torchtitan's text loader does, in torchtitan's sample format:

    ({"input": [L], "positions": [L]}, labels [L])

`positions` restart at 0 at every document piece, and a label is the next token of the same piece (-100 at
a piece's last token), so no label crosses a document. Unlike torchtitan's loader, the global batch is the
same for any data-parallel degree: step s's `dp · B` sequences come from one stream and dp rank i takes
sequences `[i·B, (i+1)·B)`, so one process with batch `dp · B` sees exactly what dp ranks see together.
The stream position is the loader's checkpoint state (resumes exactly). Every rank packs the whole global
step (dp · B sequences) and keeps its rows: host work that grows with dp, cheap next to a training step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

from fla_cp import data as fla_cp_data

IGNORE_INDEX = -100


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes plus EOS (256): vocabulary 257, no files (hf_assets_path is not read)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, *, tokenizer_path: str | None = None, **kwargs):
        super().__init__()
        self._tok = fla_cp_data.ByteTokenizer()
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.eos_token_id = self.eos_id         # what fla_cp.data.Packer reads

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids, *args, **kwargs) -> str:
        return self._tok.decode(ids)

    def get_vocab_size(self) -> int:
        return self._tok.vocab_size


def piece_sample(ids: list[int], pieces: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One sequence of document pieces in torchtitan's sample format (module docstring)."""
    tokens = torch.tensor(ids, dtype=torch.long)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in pieces])
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:-1] = tokens[1:]
    ends = torch.tensor(pieces, dtype=torch.long).cumsum(0) - 1
    labels[ends] = IGNORE_INDEX          # a piece's last token: its next token belongs to another piece
    return {"input": tokens, "positions": positions}, labels


class PackedTextDataset(IterableDataset, Stateful):
    """This dp rank's share of fla_cp's packed stream (module docstring)."""

    def __init__(self, corpus, tokenizer, seq_len: int, local_batch_size: int, dp_rank: int, dp_world_size: int,
                 seed: int = 0):
        self.packer = fla_cp_data.Packer(corpus, tokenizer, seq_len, seed=seed)
        self.local_batch_size, self.dp_rank, self.dp_world_size = local_batch_size, dp_rank, dp_world_size

    def __iter__(self):
        B = self.local_batch_size
        while True:
            # the whole step's sequences first, so the state between steps is a step boundary on every rank
            step = [self.packer.next_sequence() for _ in range(B * self.dp_world_size)]
            for ids, pieces in step[self.dp_rank * B:(self.dp_rank + 1) * B]:
                yield piece_sample(ids, pieces)

    def state_dict(self) -> dict:
        return {"packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.packer.load_state_dict(state["packer"])


class PackedTextDataLoader(ParallelAwareDataloader):
    """torchtitan data loader over `PackedTextDataset`."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "fla_cp_packed"
        seed: int = 0
        """Document order of each epoch (a permutation drawn from seed + epoch)."""

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs):
        if config.num_workers:
            # workers would each run the packer over the same stream: the rows would repeat
            raise ValueError(f"PackedTextDataLoader: --dataloader.num_workers must be 0, got {config.num_workers}")
        corpus = fla_cp_data.Corpus(config.dataset_path or None)
        dataset = PackedTextDataset(corpus, tokenizer, seq_len, local_batch_size, dp_rank, dp_world_size,
                                    seed=config.seed)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=0,
                         pin_memory=config.pin_memory, batch_size=local_batch_size,
                         snapshot_every_n_steps=snapshot_every_n_steps)
