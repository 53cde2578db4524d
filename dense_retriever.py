"""Retrieve passages for a question set and validate them. Hydra overrides and GC-DPR's flags both work, e.g.

    python dense_retriever.py model_file=out/dpr_biencoder.39 qa_dataset=nq_test ctx_datatsets=[dpr_wiki] \
        encoded_ctx_files=["embs/wiki_*"] out_file=nq_test.json index_path=indexes/wiki_flat
    python dense_retriever.py encoder=minilm qa_dataset=dev.qa.csv ctx_datatsets=[psgs.tsv] \
        encoded_ctx_files=["embs/psgs_*"] retriever=[dense,bm25,hybrid] out_file=dev.json
    python dense_retriever.py --model_file cp --qa_file nq-test.qa.csv --ctx_file psgs_w100.tsv \
        --encoded_ctx_file "embs/wiki_*.pkl" --n-docs 100 --hnsw_index --save_or_load_index
"""
import os

import hydra
from omegaconf import DictConfig

from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.options.numeric_options import check_numeric_options
from dpr.options.legacy_flags import config_top_level_keys, rewrite_sys_argv
from dpr.options.retriever_flags import DENSE_RETRIEVER_FLAGS, DENSE_RETRIEVER_GC_DEFAULTS
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.logging import setup_logging

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


@hydra.main(config_path="conf", config_name="dense_retriever", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors_in_one_line():
        check_numeric_options(cfg, "dense_retriever")
        run_dense_retriever(cfg)


if __name__ == "__main__":
    rewrite_sys_argv(
        DENSE_RETRIEVER_FLAGS, DENSE_RETRIEVER_GC_DEFAULTS, config_top_level_keys(CONFIG_DIR, "dense_retriever")
    )
    main()
