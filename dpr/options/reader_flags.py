"""GC-DPR's command lines for the reader: train_reader.py's flags as hydra overrides (through the shared
tables of legacy_flags), and preprocess_reader_data.py's argparse options."""
import argparse
from typing import Dict, List, Optional

from dpr.options.legacy_flags import CUDA_FLAGS, ENCODER_FLAGS, TRAINING_FLAGS, Flag

# The bi-encoder's gradient-cache flags have no meaning for the reader.
_BIENCODER_ONLY = ("grad_cache", "q_chunk_size", "ctx_chunk_size")

READER_FLAGS: Dict[str, Flag] = {
    **ENCODER_FLAGS,
    **CUDA_FLAGS,
    **{name: flag for name, flag in TRAINING_FLAGS.items() if name not in _BIENCODER_ONLY},
    "train_file": Flag("train_files", "list"),
    "dev_file": Flag("dev_files", "list"),
    "max_n_answers": Flag("max_n_answers"),
    "passages_per_question": Flag("passages_per_question"),
    "passages_per_question_predict": Flag("passages_per_question_predict"),
    "max_answer_length": Flag("max_answer_length"),
    "eval_top_docs": Flag("eval_top_docs", "nargs"),
    "checkpoint_file_name": Flag("checkpoint_file_name"),
    "prediction_results_file": Flag("prediction_results_file"),
    "eval_step": Flag("train.eval_step"),
    "output_dir": Flag("output_dir"),
    "fully_resumable": Flag("fully_resumable", "switch"),
    "gold_passages_src": Flag("gold_passages_src"),
    "gold_passages_src_dev": Flag("gold_passages_src_dev"),
    "num_workers": Flag("num_workers"),
}

# GC-DPR's argparse defaults where they differ from the hydra configuration's.
READER_GC_DEFAULTS: Dict[str, str] = {
    "seed": "0",
    "encoder.sequence_length": "512",
    "do_lower_case": "false",
    "train.num_train_epochs": "3",
    "train.batch_size": "2",
    "train.dev_batch_size": "4",
    "train.warmup_steps": "100",
    "passages_per_question": "2",
    "checkpoint_file_name": "dpr_reader",
}


def preprocessing_arg_parser() -> argparse.ArgumentParser:
    """preprocess_reader_data.py's options, as GC-DPR's, plus the output formats. `--gold_passages` (the
    README's spelling, ambiguous under GC-DPR's prefix matching) is accepted for --gold_passages_src."""
    parser = argparse.ArgumentParser(
        description="Turn a retriever-results JSON into reader samples {out_file}.{k}.pkl / .npz", allow_abbrev=False
    )
    parser.add_argument("--retriever_results", required=True, help="retriever results JSON (dense_retriever.py)")
    parser.add_argument("--out_file", required=True, help="output prefix: files {out_file}.{k}.{pkl,npz}")
    parser.add_argument("--is_train_set", action="store_true", help="training samples (positives and negatives)")
    parser.add_argument("--gold_passages_src", "--gold_passages", help="gold passages info JSON of the training set")
    parser.add_argument("--gold_passages_src_dev", help="gold passages info JSON of an evaluation set")
    parser.add_argument("--num_workers", type=int, default=16, help="processes (and output files)")
    parser.add_argument("--output_format", choices=("pkl", "npz", "both"), default="both",
                        help="pkl: DPR's pickles; npz: read without unpickling; both (default)")
    parser.add_argument("--pretrained_model_cfg", default="bert-base-uncased",
                        help="tokenizer: a model hub name, a local directory, or minilm")
    parser.add_argument("--encoder_model_type", default="hf_bert", help="accepted for compatibility")
    parser.add_argument("--pretrained_file", help="accepted for compatibility")
    parser.add_argument("--sequence_length", type=int, default=512, help="the reader's sequence length")
    parser.add_argument("--do_lower_case", action="store_true",
                        help="lowercase the text (as GC-DPR, off unless given: pass it for uncased models)")
    return parser


def parse_preprocessing_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = preprocessing_arg_parser().parse_args(argv)
    args.formats = ("pkl", "npz") if args.output_format == "both" else (args.output_format,)
    # GC-DPR's two gold files: the first for a training set, the second (when given) for an evaluation set
    args.gold_passages = args.gold_passages_src
    if not args.is_train_set and args.gold_passages_src_dev:
        args.gold_passages = args.gold_passages_src_dev
    return args
