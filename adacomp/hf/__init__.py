"""Hugging Face checkpoints in and out of adacomp (docs/hf.md).

families.py: the supported families' config.json <-> DecoderConfig and weight names;
convert.py: safetensors reading and the tensor layout changes; importer.py and exporter.py:
what scripts/import_hf.py and scripts/export_hf.py run. No torch anywhere.
"""
