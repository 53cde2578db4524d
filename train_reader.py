"""Train the extractive reader, or run it on dev data (no train_files). Hydra overrides and GC-DPR's flags both
work, e.g.

    python train_reader.py encoder=minilm encoder.sequence_length=350 train_files="data/reader-train.*.pkl" \
        dev_files="data/reader-dev.*.pkl" output_dir=out
    python train_reader.py model_file=out/dpr_extractive_reader.3 dev_files="data/reader-dev.*.pkl" \
        eval_top_docs=[10,20,40,50] prediction_results_file=predictions.json
    python train_reader.py --train_file "data/reader-train.*.pkl" --dev_file "data/reader-dev.*.pkl" \
        --pretrained_model_cfg minilm --do_lower_case --eval_top_docs 10 20 --output_dir out
"""
import os

import hydra
from omegaconf import DictConfig

from dpr.options.numeric_options import check_numeric_options
from dpr.options.legacy_flags import config_top_level_keys, rewrite_sys_argv
from dpr.options.reader_flags import READER_FLAGS, READER_GC_DEFAULTS
from dpr.training.reader_trainer import run_training
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.logging import setup_logging

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


@hydra.main(config_path="conf", config_name="extractive_reader_train_cfg", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors_in_one_line():
        check_numeric_options(cfg, "extractive_reader_train_cfg")
        run_training(cfg)


if __name__ == "__main__":
    rewrite_sys_argv(READER_FLAGS, READER_GC_DEFAULTS, config_top_level_keys(CONFIG_DIR, "extractive_reader_train_cfg"))
    main()
