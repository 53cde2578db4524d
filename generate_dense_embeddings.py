"""Embed one shard of a passage collection. Hydra overrides and GC-DPR's flags both work, e.g.

    python generate_dense_embeddings.py model_file=out/dpr_biencoder.39 ctx_src=dpr_wiki out_file=embs/wiki \
        shard_id=0 num_shards=50
    python generate_dense_embeddings.py -m encoder=minilm ctx_src=psgs.tsv out_file=embs/psgs shard_id=0,1 num_shards=2
    python generate_dense_embeddings.py --model_file cp --ctx_file psgs_w100.tsv --out_file embs/wiki --shard_id 0
"""
import os

import hydra
from omegaconf import DictConfig

from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.options.numeric_options import check_numeric_options
from dpr.options.legacy_flags import config_top_level_keys, rewrite_sys_argv
from dpr.options.retriever_flags import GEN_EMBS_FLAGS, GEN_EMBS_GC_DEFAULTS
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.logging import setup_logging

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


@hydra.main(config_path="conf", config_name="gen_embs", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors_in_one_line():
        check_numeric_options(cfg, "gen_embs")
        generate_dense_embeddings(cfg)


if __name__ == "__main__":
    rewrite_sys_argv(GEN_EMBS_FLAGS, GEN_EMBS_GC_DEFAULTS, config_top_level_keys(CONFIG_DIR, "gen_embs"))
    main()
