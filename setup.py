"""megakd: knowledge distillation on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megakd",
    version="0.1.0",
    description="Megatron-core knowledge distillation: TP/PP/VPP/DP teacher and student, "
                "vocab-parallel divergences, top-k transfer",
    packages=find_packages(include=["megakd", "megakd.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is deliberately unpinned: NGC containers keep their own CUDA build. On a CPU
        # machine install torch first (the Makefile pins the CPU build, torch==2.13.0).
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "safetensors",
        "psutil",  # megatron-core's dist_checkpointing needs it to save
        "pyyaml",
        "tensorboard",
        "transformers",  # --tokenizer-type HuggingFaceTokenizer, chat templates, HF conversion
        "rouge-score",  # --eval-generate: ROUGE-L of generated answers
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "mpi": ["mpi4py"],
        "wandb": ["wandb"],  # --wandb-project
        # 0.43.0: the newest ModelOpt that imports without Transformer Engine; it uses requests
        # without declaring it.
        "modelopt": ["nvidia-modelopt==0.43.0", "requests"],
        # import-linter: the layering contract (.importlinter); ModelOpt: the pruning agreement
        # test (tests/test_prune.py) and the loss benchmark's comparison rows
        "test": ["pytest", "import-linter", "nvidia-modelopt==0.43.0", "requests"],
        "study": ["matplotlib"],  # examples/cpu_study (make study): the plot in docs/quality.md
    },
)
