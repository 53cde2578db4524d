"""Preprocess a retriever-results JSON into reader samples, with GC-DPR's flags, e.g.

    python preprocess_reader_data.py --retriever_results retriever-train.json --out_file data/reader-train \
        --is_train_set --pretrained_model_cfg minilm --do_lower_case --sequence_length 350 --num_workers 2
"""
from dpr.data.reader_data import preprocess_file
from dpr.options.reader_flags import parse_preprocessing_args
from dpr.foundation.errors import user_errors_in_one_line
from dpr.foundation.logging import setup_logging


def main() -> None:
    setup_logging()
    args = parse_preprocessing_args()
    with user_errors_in_one_line():
        preprocess_file(args.retriever_results, args.out_file, args.is_train_set, args.pretrained_model_cfg,
                        args.do_lower_case, args.sequence_length, args.gold_passages, args.num_workers, args.formats)


if __name__ == "__main__":
    main()
