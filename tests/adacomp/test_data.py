"""The input pipeline: splits, packing, shuffling, per-process shards, iterator state, tokenizers."""
import os

import numpy as np
import pytest

from adacomp import data as data_lib
from adacomp.data import pipeline

DOCS = [{"text": f"doc {i}: " + "abcdefghij"[: (i % 7) + 1] * (i % 5 + 1)} for i in range(23)]


def _dataset(train, batch_size=3, seq_len=8, seed=0, process_index=0, process_count=1,
             eval_max_batches=None, docs=DOCS):
  return pipeline.LMDataset(docs, tokenizer=data_lib.ByteTokenizer(), batch_size=batch_size,
                            seq_len=seq_len, train=train, seed=seed, text_key="text",
                            eval_max_batches=eval_max_batches, process_index=process_index,
                            process_count=process_count)


def _stream(docs):
  tok = data_lib.ByteTokenizer()
  return np.concatenate([[tok.bos_id, *tok.encode(d["text"]), tok.eos_id] for d in docs])


def test_splits_are_disjoint_complete_deterministic_and_about_90_5_5():
  files = [f"/root/pkg/module_{i}.py" for i in range(2000)]
  splits = data_lib.assign_splits(files, "/root")
  again = data_lib.assign_splits(list(reversed(files)), "/root")
  assert {k: sorted(v) for k, v in splits.items()} == {k: sorted(v) for k, v in again.items()}
  assert sorted(sum(splits.values(), [])) == sorted(files)
  assert 0.87 < len(splits["train"]) / 2000 < 0.93
  assert 0.03 < len(splits["validation"]) / 2000 < 0.07


def test_splits_depend_on_the_path_below_the_root_only():
  a = data_lib.assign_splits([f"/a/x/{i}.txt" for i in range(200)], "/a/x")
  b = data_lib.assign_splits([f"/b/{i}.txt" for i in range(200)], "/b")
  assert [os.path.basename(f) for f in a["test"]] == [os.path.basename(f) for f in b["test"]]


def test_small_corpora_still_get_a_validation_and_a_test_file():
  splits = data_lib.assign_splits(["/c/a.txt", "/c/b.txt", "/c/c.txt"], "/c")
  assert all(len(v) == 1 for v in splits.values())


def test_eval_pass_targets_every_stream_token_once_in_order():
  batches = list(_dataset(train=False))
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  inputs = np.concatenate([b["inputs"][b["weights"] > 0] for b in batches])
  stream = _stream(DOCS)
  np.testing.assert_array_equal(targets, stream[1:])
  np.testing.assert_array_equal(inputs, stream[:-1])


def test_eval_pass_pads_the_last_batch_with_zero_weight():
  last = list(_dataset(train=False))[-1]
  assert last["weights"].min() == 0
  pad = last["weights"] == 0
  assert np.all(last["targets"][pad] == data_lib.ByteTokenizer.pad_id)
  assert np.all(last["target_bytes"][pad] == 0)


def test_eval_max_batches_stops_early():
  assert len(list(_dataset(train=False, eval_max_batches=2))) == 2


def test_target_bytes_count_only_byte_tokens():
  batch = next(iter(_dataset(train=False)))
  np.testing.assert_array_equal(batch["target_bytes"], (batch["targets"] < 256) * batch["weights"])


def test_training_stream_is_deterministic_per_seed():
  first = [next(it) for it in [iter(_dataset(True))] for _ in range(5)]
  again = [next(it) for it in [iter(_dataset(True))] for _ in range(5)]
  other = [next(it) for it in [iter(_dataset(True, seed=1))] for _ in range(5)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert any(not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other))


def test_each_epoch_visits_every_document_in_a_new_order():
  it = iter(_dataset(True))
  orders = [it._doc_order(epoch).tolist() for epoch in range(3)]
  assert all(sorted(o) == list(range(len(DOCS))) for o in orders)
  assert orders[0] != orders[1] != orders[2]


def test_processes_own_disjoint_documents_that_cover_the_split():
  shards = [_dataset(True, batch_size=4, process_index=i, process_count=2) for i in range(2)]
  ids = [set(s.doc_ids.tolist()) for s in shards]
  assert not ids[0] & ids[1]
  assert ids[0] | ids[1] == set(range(len(DOCS)))
  assert next(iter(shards[0]))["inputs"].shape == (2, 8)


def test_restored_iterator_state_continues_the_same_stream():
  it = iter(_dataset(True))
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  fresh = iter(_dataset(True))
  fresh.set_state(state)
  for a, b in zip(want, [next(fresh) for _ in range(4)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_training_stream_wraps_into_the_next_epoch():
  it = iter(_dataset(True, batch_size=4, seq_len=16))
  tokens = len(_stream(DOCS))
  for _ in range(tokens // (4 * 16) + 2):
    next(it)
  assert it.get_state()["epoch"] >= 1


def test_batch_size_must_divide_over_processes():
  with pytest.raises(data_lib.DataError, match="not divisible by the 2 processes"):
    data_lib.lm_dataset("train", batch_size=3, seq_len=8, train=True, process_index=0,
                        process_count=2)


def test_byte_tokenizer_round_trips_utf8_and_counts_bytes():
  tok = data_lib.ByteTokenizer()
  text = "déf ü(x):\n  return 'π'"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.num_bytes(ids).sum() == len(text.encode("utf-8"))
  assert tok.num_bytes(np.array([tok.pad_id, tok.bos_id, tok.eos_id])).sum() == 0


def test_sentencepiece_tokenizer_round_trips_and_counts_bytes(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"def f_{i}(x): return x + {i}" for i in range(300)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                 vocab_size=300, model_type="bpe", byte_fallback=True,
                                 minloglevel=2)
  tok = data_lib.get_tokenizer("sentencepiece", str(tmp_path / "m.model"))
  text = "def f_7(x): return x + ü"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.vocab_size == 300 and len(ids) < len(text.encode())
  # SentencePiece's dummy-prefix space at the start of a text is the one counted byte extra.
  assert tok.num_bytes(ids).sum() == len(text.encode("utf-8")) + 1


def test_sentencepiece_without_a_model_path_says_what_to_set():
  with pytest.raises(ValueError, match="get_tokenizer.spm_model_path"):
    data_lib.get_tokenizer("sentencepiece")


def test_local_text_builder_writes_array_record_splits_of_the_glob(corpus):
  builder = data_lib.local_text_builder(corpus["glob"], corpus["data_dir"])
  builder.download_and_prepare()
  files = sorted(os.listdir(builder.data_dir))
  assert [f for f in files if ".array_record" in f]
  want = data_lib.assign_splits(sorted(__import__("glob").glob(corpus["glob"])),
                                os.path.dirname(corpus["glob"]))
  for split, paths in want.items():
    source = builder.as_data_source(split=split)
    got = sorted(source[i]["path"].decode() if isinstance(source[i]["path"], bytes)
                 else source[i]["path"] for i in range(len(source)))
    assert got == sorted(paths)
