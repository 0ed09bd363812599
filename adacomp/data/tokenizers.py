"""Tokenizers: bytes by default (ids 0..255 are bytes, then pad, bos, eos), SentencePiece as an
option. `num_bytes` gives the UTF-8 bytes each id stands for, so bits per byte is comparable
across tokenizers."""
from typing import Optional, Protocol

import gin
import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...

  def num_bytes(self, ids: np.ndarray) -> np.ndarray: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; pad = 256, bos = 257, eos = 258."""
  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def num_bytes(self, ids) -> np.ndarray:
    return (np.asarray(ids) < 256).astype(np.float32)


class SentencePieceTokenizer:
  """A SentencePiece model; bos/eos/pad come from the model (pad falls back to unk)."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"Cannot load SentencePiece model {model_path!r} ({e}); set "
                       f"get_tokenizer.spm_model_path to a .model file.") from e
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self._sp.unk_id()
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else self._sp.unk_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
    table = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      piece = self._sp.id_to_piece(i)
      table[i] = 1.0 if self._sp.is_byte(i) else len(piece.replace("\u2581", " ").encode())
    self._bytes = table

  def encode(self, text) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids)])

  def num_bytes(self, ids) -> np.ndarray:
    return self._bytes[np.asarray(ids)]


@gin.configurable
def get_tokenizer(kind: str = "byte", spm_model_path: Optional[str] = None) -> Tokenizer:
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    if not spm_model_path:
      raise ValueError("get_tokenizer.kind='sentencepiece' needs get_tokenizer.spm_model_path.")
    return SentencePieceTokenizer(spm_model_path)
  raise ValueError(f"get_tokenizer.kind={kind!r}; use 'byte' or 'sentencepiece'.")
