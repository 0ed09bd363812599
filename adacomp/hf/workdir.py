"""The files of an imported workdir, shared by the language-model and the ViT import."""
import json
import os

import orbax.checkpoint as ocp

from adacomp import checkpointing


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"--hf_dir={hf_dir} is not a directory; pass a local Hugging Face "
                            f"model directory (config.json and *.safetensors).")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{hf_dir} has no config.json; pass a Hugging Face model directory "
                            f"as save_pretrained writes it.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def check_fresh_workdir(workdir: str) -> None:
  """Refuses a workdir that already holds a run (checkpoints, a config or a lock)."""
  held = [n for n in (checkpointing.CHECKPOINT_SUBDIR, "config.gin", checkpointing.LOCK_FILE)
          if os.path.exists(os.path.join(workdir, n))]
  if held:
    raise ValueError(f"--workdir={workdir} already holds a run ({', '.join(held)}); importing "
                     f"would mix two models' files. Pass a new --workdir, or remove that one.")


def write_workdir(workdir: str, params, meta: dict, text: str, log=print) -> None:
  """Checkpoint step 0 (params and meta, with the params' checksums) and config.gin, under the
  workdir's lock."""
  meta = dict(meta, digests={"params": checkpointing.leaf_digests(params)})
  with checkpointing.WorkdirLock(workdir, log=log):
    manager = checkpointing.make_manager(workdir, save_every=1, keep=1, async_save=False)
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(workdir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(text)
