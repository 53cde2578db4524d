"""GC-DPR's argparse flags of `generate_dense_embeddings.py` and `dense_retriever.py`, mapped onto hydra keys.

Used with `dpr.options.legacy_flags.rewrite_sys_argv`, e.g.

    python dense_retriever.py --model_file cp --qa_file nq-test.qa.csv --ctx_file psgs_w100.tsv \
        --encoded_ctx_file "embs/wiki_*.pkl" --n-docs 100 --hnsw_index --save_or_load_index
"""
from typing import Dict

from dpr.options.legacy_flags import CUDA_FLAGS, ENCODER_FLAGS, Flag

# GC-DPR's encoder defaults where they differ from the hydra configuration's (as for training).
_GC_ENCODER_DEFAULTS: Dict[str, str] = {
    "encoder.sequence_length": "512",
    "do_lower_case": "false",
}

GEN_EMBS_FLAGS: Dict[str, Flag] = {
    **ENCODER_FLAGS,
    **CUDA_FLAGS,
    "ctx_file": Flag("ctx_src"),
    "out_file": Flag("out_file"),
    "shard_id": Flag("shard_id"),
    "num_shards": Flag("num_shards"),
    "batch_size": Flag("batch_size"),
}

# GC-DPR writes {out_file}_{shard_id}.pkl
GEN_EMBS_GC_DEFAULTS: Dict[str, str] = {**_GC_ENCODER_DEFAULTS, "out_format": "gc"}

DENSE_RETRIEVER_FLAGS: Dict[str, Flag] = {
    **ENCODER_FLAGS,
    **CUDA_FLAGS,
    "qa_file": Flag("qa_dataset"),
    "ctx_file": Flag("ctx_datatsets", "list"),
    "encoded_ctx_file": Flag("encoded_ctx_files", "list"),
    "out_file": Flag("out_file"),
    "match": Flag("match"),
    "n-docs": Flag("n_docs"),
    "n_docs": Flag("n_docs"),
    "validation_workers": Flag("validation_workers"),
    "batch_size": Flag("batch_size"),
    "index_buffer": Flag("index_buffer"),
    "hnsw_index": Flag("hnsw_index", "switch"),
    "save_or_load_index": Flag("save_or_load_index", "switch"),
    "encode_q_and_save": Flag("encode_q_and_save", "switch"),
    "re_encode_q": Flag("re_encode_q", "switch"),
    "q_encoding_path": Flag("q_encoding_path"),
}

DENSE_RETRIEVER_GC_DEFAULTS: Dict[str, str] = {**_GC_ENCODER_DEFAULTS, "n_docs": "200", "batch_size": "32"}
