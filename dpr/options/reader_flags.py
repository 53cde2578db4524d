"""GC-DPR's command lines for the reader as hydra overrides, through the shared tables of legacy_flags:
train_reader.py's flags, and preprocess_reader_data.py's (whose configuration extends train_reader's)."""
import sys
from typing import Dict, Iterable, List, Optional, Sequence

from dpr.options.legacy_flags import CUDA_FLAGS, ENCODER_FLAGS, TRAINING_FLAGS, Flag, rewrite_sys_argv

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


PREPROCESSING_FLAGS: Dict[str, Flag] = {
    **ENCODER_FLAGS,
    "retriever_results": Flag("retriever_results"),
    "out_file": Flag("out_file"),
    "is_train_set": Flag("is_train_set", "switch"),
    "gold_passages_src": Flag("gold_passages_src"),
    "gold_passages_src_dev": Flag("gold_passages_src_dev"),
    "num_workers": Flag("num_workers"),
    # ours (GC-DPR writes pickles only): pkl, npz, both; the sample_formats key
    "output_format": Flag("sample_formats", "nargs"),
}

# GC-DPR's argparse defaults of preprocess_reader_data.py where they differ from the hydra configuration's: the
# same as train_reader.py's, so GC-DPR's two commands tokenize alike.
PREPROCESSING_GC_DEFAULTS: Dict[str, str] = {
    key: READER_GC_DEFAULTS[key] for key in ("encoder.sequence_length", "do_lower_case")
}

_GOLD_FLAGS = ("--gold_passages", "--gold_passages_src")


def gc_preprocessing_argv(argv: Sequence[str]) -> List[str]:
    """GC-DPR's preprocess_reader_data.py arguments in the form translate_argv reads.

    GC-DPR uses --gold_passages_src (or the README's --gold_passages) for whichever set it preprocesses; here a
    training set's gold file is gold_passages_src and an evaluation set's gold_passages_src_dev, so for an
    evaluation set without --gold_passages_src_dev the flag names the latter. `--output_format both` is both
    formats.
    """
    is_train = "--is_train_set" in argv
    has_dev_gold = any(arg.partition("=")[0] == "--gold_passages_src_dev" for arg in argv)
    out: List[str] = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        if name in _GOLD_FLAGS:
            name = "--gold_passages_src" if is_train or has_dev_gold else "--gold_passages_src_dev"
            out.append(name + equals + value)
        elif arg == "both" and out and out[-1] == "--output_format":
            out += ["pkl", "npz"]
        elif name == "--output_format" and value == "both":
            out += ["--output_format=pkl", "npz"]
        else:
            out.append(arg)
    return out


def rewrite_preprocessing_sys_argv(config_keys: Iterable[str], argv: Optional[List[str]] = None) -> None:
    """preprocess_reader_data.py's sys.argv[1:] in hydra's form, before @hydra.main reads it."""
    argv = sys.argv if argv is None else argv
    argv[1:] = gc_preprocessing_argv(argv[1:])
    rewrite_sys_argv(PREPROCESSING_FLAGS, PREPROCESSING_GC_DEFAULTS, config_keys, argv)
