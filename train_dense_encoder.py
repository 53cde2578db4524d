"""Train the DPR bi-encoder. Hydra overrides and GC-DPR's flags both work, e.g.

    python train_dense_encoder.py train=biencoder_nq train_datasets=[nq_train] dev_datasets=[nq_dev] output_dir=out
    python train_dense_encoder.py --train_file "data/*.json" --batch_size 128 --grad_cache --q_chunk_size 16 ...
"""
import os

import hydra
from omegaconf import DictConfig

from dpr.options.numeric_options import check_numeric_options
from dpr.options.legacy_flags import BIENCODER_FLAGS, BIENCODER_GC_DEFAULTS, config_top_level_keys, rewrite_sys_argv
from dpr.training.biencoder_trainer import run_training
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.logging import setup_logging

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


@hydra.main(config_path="conf", config_name="biencoder_train_cfg", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors_in_one_line():
        check_numeric_options(cfg, "biencoder_train_cfg")
        run_training(cfg)


if __name__ == "__main__":
    rewrite_sys_argv(BIENCODER_FLAGS, BIENCODER_GC_DEFAULTS, config_top_level_keys(CONFIG_DIR, "biencoder_train_cfg"))
    main()
