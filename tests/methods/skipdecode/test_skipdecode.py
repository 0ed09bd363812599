import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adacomp import decoding, scoring, training
from adacomp.methods.skipdecode import schedule as skip_schedule
from adacomp.models.decoder import DecoderConfig, DecoderLM
from tests.corpus import REPO, configure

CFG = DecoderConfig(vocab_size=50, num_layers=4, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                    max_len=64)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(DecoderLM(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))[
      "params"])


def _tokens(b=2, t=12):
  return jax.random.randint(jax.random.key(3), (b, t), 0, CFG.vocab_size)


def test_full_schedule_decoding_equals_teacher_forced_forward_pass(params):
  tokens = _tokens()
  full = DecoderLM(CFG).apply({"params": params}, tokens)
  schedule = skip_schedule.full_schedule(12, CFG.num_layers)
  got = decoding.teacher_forced_logits(decoding.Decoder(CFG), params, tokens, schedule,
                                       prompt_len=3)
  np.testing.assert_allclose(got, full, rtol=2e-4, atol=2e-4)


def test_skip_schedule_decoding_equals_the_masked_forward_pass(params):
  tokens = _tokens()
  schedule = skip_schedule.linear_skip_schedule(12, CFG.num_layers, min_active=1, warmup_len=3,
                                                warmup_layers=1)
  assert schedule[3] == 4 and schedule[-1] == 1
  mask = skip_schedule.active_layer_mask(schedule, CFG.num_layers, warmup_layers=1)
  want = DecoderLM(CFG).apply({"params": params}, tokens, layer_mask=jnp.asarray(mask))
  got = decoding.teacher_forced_logits(decoding.Decoder(CFG, warmup_layers=1), params, tokens,
                                       schedule, prompt_len=3)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  # The skipped layers changed the result: the test is not vacuous.
  full = DecoderLM(CFG).apply({"params": params}, tokens)
  assert not np.allclose(got[:, 8:], full[:, 8:], atol=1e-3)


def test_decode_step_compiled_cost_falls_with_active_layers(params):
  decoder = decoding.Decoder(CFG)
  cache = decoder.init_cache(2, 16)
  token = jnp.zeros((2,), jnp.int32)
  flops = []
  for active in (4, 3, 2, 1):
    compiled = jax.jit(decoder.step, static_argnums=(4,)).lower(
        params, cache, token, 5, active).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops.append(cost["flops"])
  per_layer = np.diff(flops[::-1])
  assert all(a > b for a, b in zip(flops, flops[1:])), flops
  # Each dropped layer removes the same amount of work.
  np.testing.assert_allclose(per_layer, per_layer[0], rtol=0.05)


def test_decode_steps_never_rewrite_earlier_cache_entries(params):
  decoder = decoding.Decoder(CFG)
  tokens = _tokens(t=8)
  cache = decoder.init_cache(2, 8)
  _, cache = decoder.prefill(params, cache, tokens[:, :3])
  schedule = skip_schedule.linear_skip_schedule(8, CFG.num_layers, warmup_len=3)
  for position in range(3, 8):
    before = jax.tree.map(np.asarray, cache["attn"])
    _, cache = decoder.step(params, cache, tokens[:, position], position,
                            jnp.asarray(schedule[position]))
    for name in ("cached_key", "cached_value"):
      np.testing.assert_array_equal(np.asarray(cache["attn"][name])[:, :, :position],
                                    before[name][:, :, :position])


def test_schedule_is_non_increasing_and_hits_its_bounds():
  s = skip_schedule.linear_skip_schedule(100, 12, max_active=10, min_active=2, warmup_len=20)
  assert np.all(np.diff(s) <= 0)
  assert s[:21].tolist() == [10] * 21 and s[-1] == 2


def test_active_layer_mask_keeps_warmup_and_top_layers_and_is_nested():
  mask = skip_schedule.active_layer_mask(np.array([6, 4, 2]), 6, warmup_layers=1)
  assert mask[:, 0].tolist() == [True] * 6
  assert mask[:, 1].tolist() == [True, False, False, True, True, True]
  assert mask[:, 2].tolist() == [True, False, False, False, False, True]
  assert np.all(mask[:, 2] <= mask[:, 1]) and np.all(mask[:, 1] <= mask[:, 0])


def test_greedy_generation_extends_the_prompt_with_argmax_tokens(params):
  decoder = decoding.Decoder(CFG)
  prompt = _tokens(t=4)
  schedule = jnp.asarray(skip_schedule.full_schedule(10, CFG.num_layers))
  gen = decoding.generate(decoder, params, prompt, schedule, jax.random.key(0),
                          max_new_tokens=6)
  out = gen.tokens
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(out[:, :4], prompt)
  logits = DecoderLM(CFG).apply({"params": params}, out)
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:-1], axis=-1))
  # Each generated token's log-probability is the full forward pass's log-softmax at it.
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 3:-1], -1), out[:, 4:, None],
                                 -1)[..., 0]
  np.testing.assert_allclose(gen.logprobs[:, 4:], expected, rtol=1e-5, atol=1e-5)
  assert not np.any(gen.generated[:, :4]) and np.all(gen.generated[:, 4:])


def test_rows_of_different_prompt_lengths_generate_as_they_would_alone(params):
  """Three prompt lengths in one batch: each prompt is used whole, and each row's tokens and
  log-probabilities equal that prompt generated alone."""
  decoder = decoding.Decoder(CFG)
  lens = [3, 7, 5]
  full = np.asarray(_tokens(b=3, t=7))
  prompt = np.where(np.arange(7)[None, :] < np.asarray(lens)[:, None], full, 0)
  schedule = jnp.asarray(skip_schedule.full_schedule(13, CFG.num_layers))
  batch = decoding.generate(decoder, params, jnp.asarray(prompt), schedule, jax.random.key(0),
                            max_new_tokens=6, prompt_lens=jnp.asarray(lens))
  for row, n in enumerate(lens):
    alone = decoding.generate(decoder, params, jnp.asarray(full[row:row + 1, :n]),
                              jnp.asarray(skip_schedule.full_schedule(n + 6, CFG.num_layers)),
                              jax.random.key(0), max_new_tokens=6)
    np.testing.assert_array_equal(batch.tokens[row, :n + 6], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[row, :n + 6], alone.logprobs[0], atol=2e-5)
    assert int(batch.generated[row].sum()) == 6 and np.all(batch.generated[row, n:n + 6])
    assert np.all(np.asarray(batch.tokens[row, n + 6:]) == 0)  # pad_id after its 6 tokens


def test_a_row_stops_at_its_own_eos(params):
  decoder = decoding.Decoder(CFG)
  prompt = _tokens(b=2, t=4)
  schedule = jnp.asarray(skip_schedule.full_schedule(12, CFG.num_layers))
  free = decoding.generate(decoder, params, prompt, schedule, jax.random.key(0),
                           max_new_tokens=8)
  eos = int(free.tokens[0, 6])  # row 0's third generated token becomes the EOS
  stopped = decoding.generate(decoder, params, prompt, schedule, jax.random.key(0),
                              max_new_tokens=8, eos_id=eos, pad_id=CFG.vocab_size - 1)
  first = [int(np.argmax(np.asarray(free.tokens[r, 4:]) == eos)) + 4
           if eos in np.asarray(free.tokens[r, 4:]) else None for r in range(2)]
  for r in range(2):
    if first[r] is None:
      np.testing.assert_array_equal(stopped.tokens[r], free.tokens[r])
      continue
    np.testing.assert_array_equal(stopped.tokens[r, :first[r] + 1], free.tokens[r, :first[r] + 1])
    assert np.all(np.asarray(stopped.tokens[r, first[r] + 1:]) == CFG.vocab_size - 1)
    assert not np.any(stopped.generated[r, first[r] + 1:])


def test_top_k_one_sampling_is_greedy_and_top_p_keeps_the_mass():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  cfg = decoding.SamplingConfig(temperature=1.0, top_k=1)
  assert int(decoding.sample(logits, key, cfg)[0]) == 0
  cfg = decoding.SamplingConfig(temperature=1.0, top_p=0.75)
  draws = {int(decoding.sample(logits, jax.random.key(i), cfg)[0]) for i in range(200)}
  assert draws == {0, 1}


@pytest.mark.parametrize("speedup", [2.0, 3.0, 5.0])
def test_schedule_for_speedup_hits_the_flop_ratio_target(speedup):
  s = skip_schedule.schedule_for_speedup(128, 12, speedup=speedup, warmup_len=32)
  assert np.all(np.diff(s) <= 0)
  assert np.all(s[:32] == 12)
  # Rounding the linear decay to whole layers leaves the mean within a tenth of a layer.
  assert abs(s[32:].mean() - 12 / speedup) <= 0.1 + 1e-9
  np.testing.assert_allclose(skip_schedule.mean_speedup(s, 12, start=32), speedup, rtol=0.05)


def test_generate_cli_keeps_every_prompt_whole_and_writes_ids_and_logprobs(corpus, tmp_path):
  configure(corpus, "train.num_steps = 2", "DecoderConfig.num_layers = 3")
  training.train(str(tmp_path / "run"))
  gin.clear_config()
  prompts = tmp_path / "prompts.txt"
  lines = ["def main(argv):", "import os", "class A:\tpass  # three lengths"]
  prompts.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "generate.py"),
       f"--checkpoint_dir={tmp_path / 'run'}", f"--prompts={prompts}", "--max_new_tokens=8",
       "--speedup=2", f"--output={tmp_path / 'gen.jsonl'}"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "gen.jsonl")]
  assert [r["prompt"] for r in rows] == lines
  eos = 258  # the byte tokenizer's
  for r in rows:
    assert len(r["ids"]) == len(r["logprobs"]) and 1 <= len(r["ids"]) <= 8
    assert len(r["ids"]) == 8 or r["ids"][-1] == eos  # stopped early only at EOS
    assert eos not in r["ids"][:-1]
    assert all(lp <= 0.0 for lp in r["logprobs"]) and r["macs_per_token"] > 0
  assert "ideal speedup" in out.stdout


def test_generate_cli_names_a_missing_or_empty_prompts_file(corpus, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  for path, message in ((tmp_path / "nope.txt", "no such file"), (empty, "holds no prompt")):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "generate.py"),
         f"--checkpoint_dir={tmp_path}", f"--prompts={path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("scan", [True, False])
def test_reported_macs_count_only_the_scheduled_layers(params, scan):
  cfg = DecoderConfig(**{**CFG.__dict__, "scan_layers": scan})
  if not scan:
    params = {**{k: v for k, v in params.items() if k != "blocks"},
              **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
                 for i in range(CFG.num_layers)}}
  tokens = _tokens()
  schedule = skip_schedule.linear_skip_schedule(12, CFG.num_layers, min_active=1, warmup_len=3)
  mask = skip_schedule.active_layer_mask(schedule, CFG.num_layers)
  _, mutables = DecoderLM(cfg).apply({"params": params}, tokens, layer_mask=jnp.asarray(mask),
                                     mutable=["intermediates"])
  got = scoring.macs_per_token(mutables["intermediates"], tokens.shape, mask)
  d, inner = CFG.d_model, CFG.num_heads * CFG.head_dim
  position = np.arange(12)
  per_layer = 4 * d * inner + 2 * inner * (position + 1) + 2 * d * CFG.d_ff
  want = schedule * per_layer + d * CFG.vocab_size
  np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)
