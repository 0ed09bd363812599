"""Installs adacomp, layers and pallas_kernels.

`pip install -e '.[dev]'` is the path the README documents; `[tf]` adds TensorFlow for
TFRecord-format TFDS datasets, which the default path never needs.
"""
import setuptools

setuptools.setup(
    name="adacomp",
    version="0.1.0",
    description="Adaptive-computation transformers in JAX/Flax.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["adacomp", "adacomp.*", "layers", "layers.*",
                 "pallas_kernels", "pallas_kernels.*"]) + ["adacomp_configs"],
    # configs/ ships inside an installed package as `adacomp_configs`, so gin finds the configs
    # without a checkout (adacomp.gin_utils.CONFIGS_DIR); a checkout uses configs/ itself.
    package_dir={"adacomp_configs": "configs"},
    package_data={"": ["*.gin", "*.md"], "adacomp_configs": ["*.gin", "*/*.gin"]},
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.10",
        "array-record>=0.7.0",
        "gin-config>=0.5.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "sentencepiece>=0.2.0",
        "safetensors>=0.4",  # Hugging Face weights in and out, without torch (adacomp/hf)
        "tokenizers>=0.19",  # Hugging Face tokenizer.json (adacomp/data/tokenizers.py)
        "scikit-learn>=1.3",  # the embedded digits image dataset (adacomp/data/digits.py)
        "tqdm>=4.66",
        "importlib_resources>=6.0",  # tensorflow-datasets needs it for builders outside tfds
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5"],
        "tf": ["tensorflow>=2.16"],
    },
)
