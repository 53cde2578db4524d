"""Convert between DPR-format checkpoints and transformers' DPRQuestionEncoder / DPRContextEncoder / DPRReader
directories (see docs/interop.md).

    python convert_dpr_checkpoint.py export-biencoder CHECKPOINT OUT_DIR [--pretrained_model_cfg DIR]
    python convert_dpr_checkpoint.py export-reader CHECKPOINT OUT_DIR [--pretrained_model_cfg DIR]
    python convert_dpr_checkpoint.py import-biencoder --question_dir Q --ctx_dir C OUT_CHECKPOINT
    python convert_dpr_checkpoint.py import-reader --reader_dir R OUT_CHECKPOINT
    python convert_dpr_checkpoint.py export-onnx CHECKPOINT OUT_DIR [--quantize int8] [--overwrite]
    python convert_dpr_checkpoint.py export-st CHECKPOINT OUT_DIR [--pretrained_model_cfg DIR] [--metrics FILE]
"""
import argparse
from typing import List, Optional

from dpr.interop import hf_dpr, onnx_export, sentence_transformers_export
from dpr.foundation.errors import UserInputError
from dpr.foundation.logging import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    base_help = (
        "BERT the checkpoint was trained from (hub name, local directory or 'minilm'); "
        "default: the one its encoder_params name"
    )
    for name, what, target in (
        ("export-biencoder", "bi-encoder", "DPRQuestionEncoder + DPRContextEncoder directories"),
        ("export-reader", "reader", "a DPRReader directory"),
    ):
        command = commands.add_parser(name, help=f"a {what} checkpoint -> {target}")
        command.add_argument("checkpoint")
        command.add_argument("out_dir")
        command.add_argument("--pretrained_model_cfg", help=base_help)
        command.add_argument("--trust_checkpoint", action="store_true",
                             help="unpickle objects beyond DPR's own (this runs code from the file: trusted files only)")
    command = commands.add_parser("export-onnx", help="a bi-encoder checkpoint -> ONNX graphs of its retrieval vectors")
    command.add_argument("checkpoint")
    command.add_argument("out_dir")
    command.add_argument("--pretrained_model_cfg", help=base_help)
    command.add_argument("--quantize", choices=["int8"], help="also write dynamically quantized (int8) graphs")
    command.add_argument("--opset", type=int, default=onnx_export.DEFAULT_OPSET)
    command.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty OUT_DIR")
    command.add_argument("--trust_checkpoint", action="store_true",
                         help="unpickle objects beyond DPR's own (this runs code from the file: trusted files only)")
    command = commands.add_parser("import-biencoder", help="DPRQuestionEncoder + DPRContextEncoder -> a checkpoint")
    command.add_argument("--question_dir", required=True)
    command.add_argument("--ctx_dir", required=True)
    command.add_argument("out_checkpoint")
    command.add_argument("--sequence_length", type=int, default=hf_dpr.DEFAULT_BIENCODER_SEQUENCE_LENGTH)
    command = commands.add_parser("import-reader", help="a DPRReader directory -> a reader checkpoint")
    command.add_argument("--reader_dir", required=True)
    command.add_argument("out_checkpoint")
    command.add_argument("--sequence_length", type=int, default=hf_dpr.DEFAULT_READER_SEQUENCE_LENGTH)
    command = commands.add_parser("export-st", help="a bi-encoder checkpoint -> a sentence-transformers folder")
    command.add_argument("checkpoint")
    command.add_argument("out_dir")
    command.add_argument("--pretrained_model_cfg", help=base_help)
    command.add_argument("--metrics", help="retrieval results for the model card: dense_retriever.py's results JSON "
                                           "(top-k accuracy) or a JSON object of metric names and numbers")
    command.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (once the new one is complete)")
    command.add_argument("--trust_checkpoint", action="store_true",
                         help="unpickle objects beyond DPR's own (this runs code from the file: trusted files only)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (UserInputError, ValueError, FileNotFoundError) as e:  # a wrong input, not a bug: say what, without a traceback
        raise SystemExit(f"error: {e}") from e
    print("\n".join(report.lines()))


def run(args: argparse.Namespace) -> hf_dpr.ConversionReport:
    if args.command == "export-biencoder":
        return hf_dpr.export_biencoder(args.checkpoint, args.out_dir, args.pretrained_model_cfg, args.trust_checkpoint)
    if args.command == "export-reader":
        return hf_dpr.export_reader(args.checkpoint, args.out_dir, args.pretrained_model_cfg, args.trust_checkpoint)
    if args.command == "export-onnx":
        return onnx_export.export_onnx(args.checkpoint, args.out_dir, args.pretrained_model_cfg, args.quantize,
                                       args.overwrite, args.trust_checkpoint, args.opset)
    if args.command == "export-st":
        return sentence_transformers_export.export_sentence_transformers(
            args.checkpoint, args.out_dir, args.pretrained_model_cfg, args.metrics, args.overwrite, args.trust_checkpoint
        )
    if args.command == "import-biencoder":
        return hf_dpr.import_biencoder(args.question_dir, args.ctx_dir, args.out_checkpoint, args.sequence_length)
    return hf_dpr.import_reader(args.reader_dir, args.out_checkpoint, args.sequence_length)


if __name__ == "__main__":
    main()
