"""Mine hard negatives for a DPR retriever training file with a trained bi-encoder (DPR's nq-adv-hn-train), e.g.

    python mine_hard_negatives.py model_file=out/dpr_biencoder.39 input_file=biencoder-train.json \
        ctx_datatsets=[psgs.tsv] encoded_ctx_files=["embs/psgs_*"] out_file=biencoder-train-hn.json \
        mine_rank_from=3 mine_rank_to=50 num_hard_negatives=10 keep_existing_hard_negatives=true

then train on the output with train_dense_encoder.py train_datasets=[biencoder-train-hn.json].
"""
import hydra
from omegaconf import DictConfig

from dpr.options.numeric_options import check_numeric_options
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.logging import setup_logging
from dpr.indexing.hard_negatives import mine_hard_negatives


@hydra.main(config_path="conf", config_name="mine_hard_negatives", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors_in_one_line():
        check_numeric_options(cfg, "mine_hard_negatives")
        mine_hard_negatives(cfg)


if __name__ == "__main__":
    main()
