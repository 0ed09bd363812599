"""Tokenizers: bytes by default (ids 0..255 are bytes, then pad, bos, eos), SentencePiece and
Hugging Face `tokenizer.json` (the `tokenizers` library) as options. `num_bytes` gives the UTF-8
bytes each id stands for, so bits per byte is comparable across tokenizers."""
import json
import os
import re
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


def _byte_level_alphabet() -> dict:
  """GPT-2's byte-level BPE alphabet: printable stand-in character -> the byte it encodes."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) +
               list(range(ord("\xae"), ord("\xff") + 1)))
  chars, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      chars[chr(byte)] = byte
    else:
      chars[chr(256 + extra)] = byte
      extra += 1
  return chars


class HFTokenizer:
  """A Hugging Face `tokenizer.json` through the `tokenizers` library (no transformers).

  `encode` gives the text's ids without special tokens (the data pipeline adds bos/eos around
  each document); `encode_prompt` gives them exactly as transformers' tokenizer does by default
  (its post-processor's special tokens included), which is what generation feeds the model.
  Special ids: the arguments, else `tokenizer_config.json` beside the file (bos/eos/pad tokens),
  pad falling back to eos. Bytes per id: byte-level tokens count their bytes, SentencePiece-style
  pieces their UTF-8 length ('\u2581' a space, '<0xNN>' one byte), special tokens none.
  """

  def __init__(self, path: str, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
               pad_id: Optional[int] = None):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"No Hugging Face tokenizer at {path!r}; set "
                       f"get_tokenizer.hf_tokenizer_path to a tokenizer.json (or the directory "
                       f"holding one).")
    self._tok = _Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = self._special_ids(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    self.bos_id = bos_id if bos_id is not None else named.get("bos")
    self.eos_id = eos_id if eos_id is not None else named.get("eos")
    if self.eos_id is None:
      raise ValueError(f"The tokenizer {path!r} names no eos token; bind get_tokenizer.eos_id "
                       f"(config.json's eos_token_id).")
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    self.pad_id = pad_id if pad_id is not None else named.get("pad", self.eos_id)
    self._bytes = self._byte_table()

  def _special_ids(self, config_path: str) -> dict:
    if not os.path.isfile(config_path):
      return {}
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    ids = {}
    for kind in ("bos", "eos", "pad"):
      token = config.get(f"{kind}_token")
      token = token.get("content") if isinstance(token, dict) else token
      if token is not None and self._tok.token_to_id(token) is not None:
        ids[kind] = self._tok.token_to_id(token)
    return ids

  def _byte_table(self) -> np.ndarray:
    alphabet = _byte_level_alphabet()
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    table = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if i in special or piece is None:
        continue
      if all(c in alphabet for c in piece):
        table[i] = len(piece)
      elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        table[i] = 1.0
      else:
        table[i] = len(piece.replace("\u2581", " ").encode())
    return table

  def encode(self, text) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_prompt(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids)])

  def num_bytes(self, ids) -> np.ndarray:
    return self._bytes[np.asarray(ids)]


TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")


@gin.configurable
def get_tokenizer(kind: str = "byte", spm_model_path: Optional[str] = None,
                  hf_tokenizer_path: Optional[str] = None, bos_id: Optional[int] = None,
                  eos_id: Optional[int] = None, pad_id: Optional[int] = None) -> Tokenizer:
  """The configured tokenizer; bos/eos/pad ids override the HF tokenizer's own."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    if not spm_model_path:
      raise ValueError("get_tokenizer.kind='sentencepiece' needs get_tokenizer.spm_model_path.")
    return SentencePieceTokenizer(spm_model_path)
  if kind == "hf":
    if not hf_tokenizer_path:
      raise ValueError("get_tokenizer.kind='hf' needs get_tokenizer.hf_tokenizer_path (a "
                       "tokenizer.json or the directory holding one).")
    return HFTokenizer(hf_tokenizer_path, bos_id, eos_id, pad_id)
  raise ValueError(f"get_tokenizer.kind={kind!r}; use one of {TOKENIZER_KINDS}.")
