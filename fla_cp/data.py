"""Real text for training without downloads: a corpus of documents, a tokenizer, and a packer.

    corpus = Corpus(None)                    # the Python standard library's .py sources
    corpus = Corpus("notes.jsonl")           # or a local file, or a directory of .txt/.md/.py/.rst/.jsonl
    tok = load_tokenizer("byte")             # bytes 0..255 + EOS; or a local HF tokenizer directory
    packer = Packer(corpus, tok, seq_len=1024, seed=0)
    batch = packer.next_batch(4)             # PackedBatch: input_ids [1, 4*1024], labels, cu_seqlens
    state = packer.state_dict()              # the data position; load_state_dict() resumes there

Documents are concatenated (each followed by EOS) and cut into sequences of `seq_len` tokens. A batch
of B sequences is one packed row `[1, B*seq_len]` whose `cu_seqlens` mark every document piece, so a
recurrent state never crosses from one document (or one sequence) into the next. The label at the
first token of every piece is -100: the token before it belongs to another piece and must not be
trained to predict it (the model shifts labels by one on the global row).

Everything is deterministic given `seed`: the document order of epoch e is a permutation drawn from
`seed + e`, and the position (epoch, document, offset) is the whole state.
"""
from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")      # a whole file is one document
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl",)         # what Corpus reads from a directory (a .jsonl line is one)


def stdlib_sources() -> list[Path]:
    """The .py files of this interpreter's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts]
    return sorted(files)


class Corpus:
    """An indexed list of documents: a whole text file is one document, a .jsonl line is one.

    `data=None` means the standard library's sources. A .jsonl line is a JSON object whose "text"
    field (or first string field) is the document, or a JSON string. Documents are read on demand.
    """

    def __init__(self, data: str | os.PathLike | None = None):
        if data is None:
            files = stdlib_sources()
            self.name = "python-stdlib"
        else:
            path = Path(data)
            if not path.exists():
                raise FileNotFoundError(f"--data {path} does not exist")
            if path.is_dir():
                files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
            else:
                files = [path]
            self.name = str(path)
        self.entries: list[tuple[Path, int]] = []   # (file, byte offset of the .jsonl line, or -1)
        for f in files:
            if f.suffix == ".jsonl":
                offset = 0
                with open(f, "rb") as fh:
                    for line in fh:
                        if line.strip():
                            self.entries.append((f, offset))
                        offset += len(line)
            else:
                self.entries.append((f, -1))
        if not self.entries:
            raise ValueError(f"--data {data}: no documents found (looked for {', '.join(DATA_SUFFIXES)} files)")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> str:
        path, offset = self.entries[i]
        if offset < 0:
            return path.read_text(encoding="utf-8", errors="replace")
        with open(path, "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self._where(path, offset)}: not valid JSON: {e.msg} (column {e.colno})") from None
        if isinstance(obj, str):
            return obj
        if not isinstance(obj, dict):
            raise ValueError(f"{self._where(path, offset)}: expected a JSON object with a text field or a JSON "
                             f"string, got {type(obj).__name__}")
        if "text" in obj:
            return str(obj["text"])
        for value in obj.values():
            if isinstance(value, str):
                return value
        raise ValueError(f"{self._where(path, offset)}: no text field (no string value) in {list(obj)}")

    @staticmethod
    def _where(path: Path, offset: int) -> str:
        """`file:line` of the .jsonl line at byte `offset` (counted only for an error message)."""
        with open(path, "rb") as fh:
            line = fh.read(offset).count(b"\n") + 1
        return f"{path}:{line}"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS = 256.

    EOS is also the BOS: it is the token before every document in the packed stream, so a prompt
    that starts a fresh document starts with it. There is no padding token (packing never pads)."""
    name = "byte"
    eos_token_id = 256
    bos_token_id = 256
    pad_token_id = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (never downloads)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            if Path(path).is_dir():     # a directory without a usable tokenizer: HF's message says what is missing
                raise
            # otherwise HF's message is about failing to reach huggingface.co, which we never try
            raise FileNotFoundError(f"--tokenizer {path!r}: not 'byte' and no such directory (a local Hugging Face "
                                    f"tokenizer directory is expected; nothing is downloaded)") from e
        self.name = str(path)
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer {path} has neither an EOS nor a SEP token to end documents with")
        self.eos_token_id = int(eos)
        self.bos_token_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_token_id
        self.pad_token_id = self.tok.pad_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str = "byte"):
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor    # [1, B*seq_len] int64
    labels: torch.Tensor       # [1, B*seq_len] int64, -100 at the first token of every piece
    cu_seqlens: torch.Tensor   # [N+1] int64, boundaries of the N document pieces in the row

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.cu_seqlens.to(device))

    def split(self, n: int, i: int) -> PackedBatch:
        """The i-th of n equal slices (whole sequences) of this batch: data-parallel sharding."""
        total = self.num_tokens
        if total % n:
            raise ValueError(f"cannot split {total} tokens into {n} equal parts")
        lo, hi = i * total // n, (i + 1) * total // n
        cu = self.cu_seqlens
        inner = cu[(cu > lo) & (cu < hi)]
        new_cu = torch.cat([cu.new_tensor([lo]), inner, cu.new_tensor([hi])]) - lo
        return PackedBatch(self.input_ids[:, lo:hi], self.labels[:, lo:hi], new_cu)


class Packer:
    """Cuts the corpus's token stream into sequences of `seq_len`; its state is the data position."""

    def __init__(self, corpus: Corpus, tokenizer, seq_len: int, seed: int = 0):
        self.corpus, self.tokenizer, self.seq_len, self.seed = corpus, tokenizer, seq_len, seed
        self.epoch, self.doc, self.offset = 0, 0, 0   # next token: document #doc of epoch, at offset
        self._order_epoch, self._order = None, None
        self._cache_key, self._cache_tokens = None, None

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc": self.doc, "offset": self.offset, "seed": self.seed,
                "seq_len": self.seq_len, "num_docs": len(self.corpus)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_docs"] != len(self.corpus) or state["seed"] != self.seed:
            raise ValueError(f"data position was saved for {state['num_docs']} documents with seed {state['seed']}, "
                             f"this corpus has {len(self.corpus)} documents and seed {self.seed}")
        self.epoch, self.doc, self.offset = state["epoch"], state["doc"], state["offset"]

    # -- documents ------------------------------------------------------------------------------
    def _doc_index(self, epoch: int, i: int) -> int:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng(self.seed + epoch).permutation(len(self.corpus))
            self._order_epoch = epoch
        return int(self._order[i])

    def _tokens(self, epoch: int, i: int) -> list[int]:
        key = (epoch, i)
        if self._cache_key != key:
            text = self.corpus[self._doc_index(epoch, i)]
            ids = self.tokenizer.encode(text) if text else []
            self._cache_key, self._cache_tokens = key, (ids + [self.tokenizer.eos_token_id] if ids else [])
        return self._cache_tokens

    # -- sequences ------------------------------------------------------------------------------
    def next_sequence(self) -> tuple[list[int], list[int]]:
        """`seq_len` tokens and the lengths of the document pieces they are made of."""
        ids, pieces = [], []
        empty_run = 0
        while len(ids) < self.seq_len:
            tokens = self._tokens(self.epoch, self.doc)
            take = tokens[self.offset:self.offset + self.seq_len - len(ids)]
            if take:
                ids.extend(take)
                pieces.append(len(take))
                self.offset += len(take)
                empty_run = 0
            else:
                empty_run += 1
                if empty_run > len(self.corpus):
                    raise ValueError("every document of the corpus is empty")
            if self.offset >= len(tokens):
                self.doc, self.offset = self.doc + 1, 0
                if self.doc == len(self.corpus):
                    self.epoch, self.doc = self.epoch + 1, 0
        return ids, pieces

    def next_batch(self, batch_size: int) -> PackedBatch:
        ids, pieces = [], []
        for _ in range(batch_size):
            seq_ids, seq_pieces = self.next_sequence()
            ids.extend(seq_ids)
            pieces.extend(seq_pieces)
        cu = torch.tensor([0] + pieces, dtype=torch.long).cumsum(0)
        input_ids = torch.tensor(ids, dtype=torch.long).unsqueeze(0)
        labels = input_ids.clone()
        labels[0, cu[:-1]] = -100
        return PackedBatch(input_ids, labels, cu)
