"""Input pipelines: TFDS sources (the embedded `local_text` corpus or any prepared dataset),
tokenizers, packing into fixed-length windows, per-process sharding, checkpointable state."""
from adacomp.data.local_text import DataError, LocalText, assign_splits, local_text_builder
from adacomp.data.pipeline import LMDataset, PackedIterator, lm_dataset
from adacomp.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                     get_tokenizer)

__all__ = ["ByteTokenizer", "DataError", "LMDataset", "LocalText", "PackedIterator",
           "SentencePieceTokenizer", "Tokenizer", "assign_splits", "get_tokenizer",
           "lm_dataset", "local_text_builder"]
