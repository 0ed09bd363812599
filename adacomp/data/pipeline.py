"""Language-model batches from TFDS sources: tokenize, pack, shuffle, shard, checkpoint.

Documents become `bos + tokens + eos` and are concatenated into one stream that is cut into
windows of `seq_len + 1` tokens with stride `seq_len` (inputs = window[:-1], targets =
window[1:]), so every stream token is a target exactly once. Windows may span document
boundaries and attention then crosses them, as in GPT-style pre-training; the eos/bos pair marks
the boundary.

Training (`train=True`): each process owns the documents `process_index::process_count` of
the split, visits them in a fresh seeded permutation every epoch, and repeats forever. The
iterator's state is the stream position where the next batch starts (epoch, document, token
offset), a few integers, so saving and restoring it is exact and cheap.

Evaluation (`train=False`): one pass in document order with no shuffling; the last window and
the last batch are padded with weight 0. Every process reads the same stream and keeps its own
rows of each global batch, so all processes run the same number of batches.

The source is `tfds.data_source` (array_record, random access, no TensorFlow) for named
datasets and for the `local_text` builder, wrapped in a `grain.MapDataset` that tokenizes
documents on access; TFRecord-format datasets go through `tfds.load` and
need the `[tf]` extra.
"""
import os
from typing import Iterator, Optional

import gin
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from adacomp.data.local_text import DataError, local_text_builder
from adacomp.data.tokenizers import Tokenizer, get_tokenizer


def _default_data_dir(data_dir: Optional[str]) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _prepare_message(name: str, data_dir: str) -> str:
  return (f"TFDS dataset {name!r} is not prepared under data_dir {data_dir!r}. Prepare it "
          f"once with `pip install -e '.[tf]' && tfds build {name.split('/')[0]} "
          f"--data_dir={data_dir} --file_format=array_record` (for a config, e.g. "
          f"`tfds build c4 --config=en`), or set lm_dataset.data_dir to the directory that "
          f"holds it.")


def _local_text_source(split: str, glob: Optional[str], data_dir: str):
  builder = local_text_builder(glob, data_dir)
  if not builder.is_prepared():
    if jax.process_index() == 0:
      print(f"Preparing local_text/{builder.builder_config.name} under {data_dir} "
            f"(one-time)...", flush=True)
      builder.download_and_prepare()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("local_text_prepared")
  return builder.as_data_source(split=split)


class _TFRecordSource:
  """Sequential access to a TFRecord-format TFDS split through tfds.load (needs TensorFlow)."""

  def __init__(self, name, split, data_dir):
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise DataError(f"lm_dataset.file_format='tfrecord' reads {name!r} with TensorFlow; "
                      f"install it with `pip install -e '.[tf]'` or prepare the dataset as "
                      f"array_record.") from e
    try:
      ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(_prepare_message(name, data_dir) + f" ({e})") from e
    self._examples = list(tfds.as_numpy(ds))

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, i):
    return self._examples[i]


def _open_source(name, split, data_dir, glob, file_format):
  if name == "local_text":
    return _local_text_source(split, glob, data_dir)
  if file_format == "tfrecord":
    return _TFRecordSource(name, split, data_dir)
  try:
    sources = tfds.data_source(name, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(_prepare_message(name, data_dir) + f" (tfds said: {e})") from e
  if split not in sources:
    raise DataError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(sources)}.")
  return sources[split]


def source_files(source) -> list:
  """The files behind a TFDS data source (array_record), for error messages."""
  inner = getattr(source, "data_source", source)
  return [str(p) for p in getattr(inner, "_paths", None) or []]


def read_error(source, what: str, e: BaseException) -> DataError:
  files = source_files(source)
  where = ", ".join(files) if files else "the dataset's files"
  return DataError(
      f"Cannot read {what} from {where}: {str(e).splitlines()[0][:200]}. The data file is "
      f"damaged (a copy or disk error, or an interrupted preparation); delete that dataset's "
      f"folder under lm_dataset.data_dir and rerun to prepare it again (or restore it from a "
      f"copy).")


class LMDataset:
  """An iterable of packed LM batches; `iter()` gives a checkpointable iterator."""

  def __init__(self, source, *, tokenizer: Tokenizer, batch_size: int, seq_len: int,
               train: bool, seed: int, text_key: str, eval_max_batches: Optional[int],
               process_index: int, process_count: int):
    self.source = source
    self.tokenizer = tokenizer
    self.local_batch = batch_size // process_count
    self.batch_size, self.seq_len, self.train, self.seed = batch_size, seq_len, train, seed
    self.text_key = text_key
    self.eval_max_batches = eval_max_batches
    self.process_index, self.process_count = process_index, process_count
    n = len(source)
    self.doc_ids = (np.arange(process_index, n, process_count) if train else np.arange(n))
    if len(self.doc_ids) == 0:
      raise DataError(f"The split has {n} documents, too few to give every one of "
                      f"{process_count} processes one; use a larger corpus or split.")
    self.documents = grain.MapDataset.source(source).map(self._encode)

  def _encode(self, example) -> np.ndarray:
    tokens = self.tokenizer.encode(example[self.text_key])
    return np.concatenate([[self.tokenizer.bos_id], tokens, [self.tokenizer.eos_id]]).astype(
        np.int32)

  def document(self, doc_id: int) -> np.ndarray:
    """bos + tokens + eos of document `doc_id` (random access through grain)."""
    try:
      return self.documents[int(doc_id)]
    except (RuntimeError, OSError, ValueError) as e:
      # array_record raises RuntimeError("Corrupted Riegeli/records file ...") with no file name.
      raise read_error(self.source, f"document {doc_id}", e) from e

  def __iter__(self) -> "PackedIterator":
    return PackedIterator(self)



def epoch_order(ids: np.ndarray, epoch: int, train: bool, seed: int,
                process_index: int) -> np.ndarray:
  """This process's example ids in the order of `epoch`: a fresh seeded permutation per epoch
  when training, the stored order for evaluation (shared by the text and image pipelines)."""
  if not train:
    return ids
  rng = np.random.default_rng([seed, epoch, process_index])
  return ids[rng.permutation(len(ids))]

class PackedIterator(Iterator[dict]):
  """Yields {'inputs', 'targets', 'weights', 'target_bytes'} numpy batches of this process."""

  def __init__(self, ds: LMDataset):
    self._ds = ds
    self._state = {"epoch": 0, "doc": 0, "offset": 0, "batches": 0}
    self._order_epoch, self._order = None, None
    self._cache = {}

  # -- state ---------------------------------------------------------------------------------
  def get_state(self) -> dict:
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    self._state = {k: int(state[k]) for k in ("epoch", "doc", "offset", "batches")}

  # -- stream --------------------------------------------------------------------------------
  def _doc_order(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      self._order_epoch, self._order = epoch, epoch_order(
          self._ds.doc_ids, epoch, self._ds.train, self._ds.seed, self._ds.process_index)
    return self._order

  def _tokens(self, epoch: int, position: int) -> np.ndarray:
    doc_id = int(self._doc_order(epoch)[position])
    if doc_id not in self._cache:
      if len(self._cache) >= 16:
        self._cache.pop(next(iter(self._cache)))
      self._cache[doc_id] = self._ds.document(doc_id)
    return self._cache[doc_id]

  def _walk(self, count: int, collect: bool):
    """Moves `count` tokens forward from the state's position, optionally collecting them.

    Returns (tokens collected, new (epoch, doc, offset)); an eval pass stops at the end.
    """
    epoch, doc, offset = self._state["epoch"], self._state["doc"], self._state["offset"]
    num_docs = len(self._ds.doc_ids)
    parts = []
    while count > 0:
      if doc >= num_docs:
        if not self._ds.train:
          break
        epoch, doc, offset = epoch + 1, 0, 0
      tokens = self._tokens(epoch, doc)
      take = min(count, len(tokens) - offset)
      if collect:
        parts.append(tokens[offset:offset + take])
      count -= take
      offset += take
      if offset == len(tokens):
        doc, offset = doc + 1, 0
    collected = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return collected, (epoch, doc, offset)

  def _window(self) -> Optional[np.ndarray]:
    """The next seq_len + 1 stream tokens (fewer at the end of an eval pass); the window after
    it starts at its last token, so each token is a target once."""
    window, _ = self._walk(self._ds.seq_len + 1, collect=True)
    if len(window) <= 1:
      return None
    _, (epoch, doc, offset) = self._walk(self._ds.seq_len, collect=False)
    self._state.update(epoch=epoch, doc=doc, offset=offset)
    return window

  def __next__(self) -> dict:
    ds = self._ds
    if not ds.train and ds.eval_max_batches is not None and \
        self._state["batches"] >= ds.eval_max_batches:
      raise StopIteration
    rows = ds.batch_size if not ds.train else ds.local_batch
    windows = []
    for _ in range(rows):
      w = self._window()
      if w is None:
        break
      windows.append(w)
    if not windows:
      raise StopIteration
    length = ds.seq_len
    inputs = np.full((rows, length), ds.tokenizer.pad_id, np.int32)
    targets = np.full((rows, length), ds.tokenizer.pad_id, np.int32)
    weights = np.zeros((rows, length), np.float32)
    for i, w in enumerate(windows):
      n = len(w) - 1
      inputs[i, :n], targets[i, :n], weights[i, :n] = w[:-1], w[1:], 1.0
    target_bytes = ds.tokenizer.num_bytes(targets) * weights
    self._state["batches"] += 1
    batch = {"inputs": inputs, "targets": targets, "weights": weights,
             "target_bytes": target_bytes.astype(np.float32)}
    if not ds.train:
      rows_here = slice(ds.process_index * ds.local_batch,
                        (ds.process_index + 1) * ds.local_batch)
      batch = {k: v[rows_here] for k, v in batch.items()}
    return batch


@gin.configurable
def lm_dataset(split: str, *, batch_size: int, seq_len: int, train: bool,
               name: str = "local_text", data_dir: Optional[str] = None,
               text_key: str = "text", glob: Optional[str] = None, seed: int = 0,
               tokenizer: Optional[Tokenizer] = None, eval_max_batches: Optional[int] = None,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               file_format: str = "array_record") -> LMDataset:
  """Packed next-token batches of `split` (see the module docstring).

  `batch_size` is global; each process gets batch_size // process_count rows.
  `name='local_text'` with `glob=None` is the embedded standard-library corpus.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise DataError(f"Global batch size {batch_size} is not divisible by the {process_count} "
                    f"processes; make train.batch_size a multiple of {process_count}.")
  data_dir = _default_data_dir(data_dir)
  try:
    source = _open_source(name, split, data_dir, glob, file_format)
  except (RuntimeError, OSError) as e:
    raise DataError(f"Cannot open split {split!r} of {name!r} under {data_dir!r}: "
                    f"{str(e).splitlines()[0][:200]}. The data files are damaged; delete that "
                    f"dataset's folder and rerun to prepare it again.") from e
  if len(source) == 0:
    raise DataError(f"Split {split!r} of {name!r} under {data_dir!r} is empty; use a larger "
                    f"corpus (a glob matching more files) or another split.")
  return LMDataset(source, tokenizer=tokenizer or get_tokenizer(), batch_size=batch_size,
                   seq_len=seq_len, train=train, seed=seed, text_key=text_key,
                   eval_max_batches=eval_max_batches, process_index=process_index,
                   process_count=process_count)
