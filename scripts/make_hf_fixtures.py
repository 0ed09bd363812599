r"""Writes the tiny Hugging Face fixtures of tests/hf (run with torch + transformers installed).

  python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch transformers safetensors
  /tmp/torchvenv/bin/python scripts/make_hf_fixtures.py      # rewrites tests/testdata/hf/
  /tmp/torchvenv/bin/python scripts/make_hf_fixtures.py vit  # the ViT fixture only

Each family gets a randomly initialised model with every weight, bias and norm scale drawn at
random (HF's own init leaves biases at zero, which would hide a mis-mapped bias), saved with
`save_pretrained` (safetensors; Llama's sharded with an index) under
tests/testdata/hf/<family>/, and `reference.npz`: the inputs and transformers' float32 logits
(eager attention). The Llama directory also holds a tiny byte-level BPE `tokenizer.json` (BOS
added by its post-processor) and `generate.json`: a prompt, its ids as the tokenizer encodes
it, and transformers' greedy `generate()` ids with their per-token log-probabilities.
adacomp itself never imports torch: the tests compare against these files, and against a live
transformers when it is importable.
"""
import json
import os
import shutil

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                    "testdata", "hf")
VOCAB = 96
SEQ = 16  # longer than Mistral's window below, so the window is exercised
PROMPT = "the cat sat on the mat"
CORPUS = ["the cat sat on the mat", "a dog ran in the park", "hello world, hello there",
          "adaptive computation spends less on easy tokens"] * 4


def make_tokenizer(path: str) -> Tokenizer:
  """A byte-level BPE of VOCAB ids whose post-processor adds <s> (as Llama's does)."""
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB * 3, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
      ("<s>", tok.token_to_id("<s>"))])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>"}, f)
  return tok


def randomise(model, seed: int):
  """Every parameter drawn at random: weights N(0, 0.2^2), norm scales 1 + N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = "norm" in name or "ln_" in name or "layernorm" in name.lower()
      p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.2 * noise)
  return model.eval()


def lm_configs(tokenizer_vocab: int) -> dict:
  common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
  return {
      "llama": transformers.LlamaConfig(
          vocab_size=tokenizer_vocab, num_key_value_heads=2, tie_word_embeddings=False,
          rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, **common),
      "qwen2": transformers.Qwen2Config(
          vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
          **common),
      "mistral": transformers.MistralConfig(
          vocab_size=VOCAB, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False,
          **common),
      "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
      "opt": transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=32),
  }


def save_lm(family: str, config, seed: int, tokenizer=None):
  path = os.path.join(ROOT, family)
  if tokenizer is None:
    shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path, exist_ok=True)
  torch.manual_seed(seed)
  model = randomise(transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", torch_dtype=torch.float32), seed)
  model.save_pretrained(path, max_shard_size="60KB" if family == "llama" else "10GB")
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config.vocab_size, (2, SEQ)).astype(np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(ids)).logits.float().numpy()
  np.savez(os.path.join(path, "reference.npz"), ids=ids.astype(np.int32), logits=logits)
  if tokenizer is not None:
    prompt_ids = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                           output_scores=True, return_dict_in_generate=True,
                           eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id)
    new = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, new)]
    with open(os.path.join(path, "generate.json"), "w") as f:
      json.dump({"prompt": PROMPT, "prompt_ids": prompt_ids, "ids": new, "logprobs": logprobs},
                f, indent=1)
  print(f"{family}: {sum(p.numel() for p in model.parameters()):,} params -> {path}")


def save_vit(seed: int):
  path = os.path.join(ROOT, "vit")
  shutil.rmtree(path, ignore_errors=True)
  # The digits data's shape (32 x 32, one channel, ten classes), so AS-ViT fine-tunes it.
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8,
                                  num_channels=1, num_labels=10)
  torch.manual_seed(seed)
  model = randomise(transformers.ViTForImageClassification(config), seed)
  model.save_pretrained(path)
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(pixels)).logits.float().numpy()
  np.savez(os.path.join(path, "reference.npz"), pixel_values=pixels, logits=logits)
  print(f"vit: {sum(p.numel() for p in model.parameters()):,} params -> {path}")


def main(only=None):
  if only == "vit":
    save_vit(seed=10)
    return
  llama_dir = os.path.join(ROOT, "llama")
  shutil.rmtree(llama_dir, ignore_errors=True)
  os.makedirs(llama_dir)
  tokenizer = make_tokenizer(llama_dir)
  for seed, (family, config) in enumerate(lm_configs(tokenizer.get_vocab_size()).items()):
    save_lm(family, config, seed, tokenizer if family == "llama" else None)
  save_vit(seed=10)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  main(*sys.argv[1:])
