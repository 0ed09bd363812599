"""Input pipelines: TFDS sources (the embedded `local_text` corpus or any prepared dataset),
tokenizers, packing into fixed-length windows, per-process sharding, checkpointable state; image
classification batches (the embedded `digits` images, cifar10, imagenet2012)."""
from adacomp.data.digits import Digits, digits_builder
from adacomp.data.images import ImageDataset, ImageIterator, image_dataset
from adacomp.data.local_text import DataError, LocalText, assign_splits, local_text_builder
from adacomp.data.pipeline import LMDataset, PackedIterator, lm_dataset
from adacomp.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer,
                                     get_tokenizer)

__all__ = ["ByteTokenizer", "DataError", "Digits", "ImageDataset", "ImageIterator", "LMDataset", "LocalText", "PackedIterator",
           "SentencePieceTokenizer", "Tokenizer", "assign_splits", "digits_builder", "get_tokenizer",
           "image_dataset",
           "lm_dataset", "local_text_builder"]
