"""Hugging Face ViTForImageClassification checkpoints into adacomp's ViT (adacomp/models/vit.py)."""

VISION_ARCHITECTURES = ("ViTForImageClassification",)
DEIT_ARCHITECTURES = ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")


def is_vision(hf: dict) -> bool:
  names = set(hf.get("architectures") or [])
  return bool(names & set(VISION_ARCHITECTURES + DEIT_ARCHITECTURES))


def import_vit(hf_dir: str, workdir: str, log=print):
  raise NotImplementedError
