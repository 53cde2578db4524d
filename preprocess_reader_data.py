"""Preprocess a retriever-results JSON into reader samples {out_file}.{k}.pkl / .npz, tokenized as train_reader.py
tokenizes: the configuration (conf/preprocess_reader_data.yaml) extends train_reader's, so both use the same
encoder, sequence length and lower-casing unless told otherwise. Hydra overrides and GC-DPR's flags both work, e.g.

    python preprocess_reader_data.py retriever_results=retriever-train.json out_file=data/reader-train \
        is_train_set=true encoder=minilm encoder.sequence_length=350 num_workers=2
    python preprocess_reader_data.py --retriever_results retriever-train.json --out_file data/reader-train \
        --is_train_set --pretrained_model_cfg minilm --do_lower_case --sequence_length 350 --num_workers 2
"""
import logging
import os

import hydra
from omegaconf import DictConfig

from dpr.data.reader_data import SampleFileError, SampleFileOptions, preprocess_retriever_results
from dpr.options.numeric_options import check_numeric_options
from dpr.options.legacy_flags import config_top_level_keys
from dpr.options.reader_flags import rewrite_preprocessing_sys_argv
from dpr.foundation.config_values import existing_file, true_or_false
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.files import ensure_writable_output
from dpr.foundation.logging import setup_logging

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
CONFIG_NAME = "preprocess_reader_data"

logger = logging.getLogger(__name__)


def run_preprocessing(cfg: DictConfig) -> list:
    """Every option and file checked, then the preprocessing: a mistake ends the run before any work."""
    if not cfg.retriever_results or not cfg.out_file:
        raise SampleFileError("retriever_results and out_file are required, e.g. retriever_results=dev.json "
                              "out_file=reader/dev")
    is_train = true_or_false("is_train_set", cfg.is_train_set, SampleFileError)
    options = SampleFileOptions.from_config(cfg)
    existing_file("retriever_results", cfg.retriever_results, "a retriever-results JSON (dense_retriever.py's "
                  "out_file)", SampleFileError)
    gold_key = "gold_passages_src" if is_train else "gold_passages_src_dev"
    if options.gold_passages(is_train):
        existing_file(gold_key, options.gold_passages(is_train), "a gold passages JSON", SampleFileError)
    # out_file is a prefix: its files are {out_file}.{k}.{format}, so it must not be a folder
    ensure_writable_output(cfg.out_file, "out_file")
    if not is_train and options.gold_passages_src and not options.gold_passages_src_dev:
        logger.warning("gold_passages_src is for training sets (is_train_set=true); an evaluation set uses "
                       "gold_passages_src_dev, which is not set")
    return preprocess_retriever_results(cfg.retriever_results, cfg.out_file, is_train, options)


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)  # absolute: also when imported
def preprocess(cfg: DictConfig) -> None:
    setup_logging()
    with user_errors_in_one_line():
        check_numeric_options(cfg, CONFIG_NAME)
        run_preprocessing(cfg)


def main() -> None:
    keys = config_top_level_keys(CONFIG_DIR, CONFIG_NAME) + config_top_level_keys(CONFIG_DIR,
                                                                                  "extractive_reader_train_cfg")
    rewrite_preprocessing_sys_argv(keys)
    preprocess()


if __name__ == "__main__":
    main()
