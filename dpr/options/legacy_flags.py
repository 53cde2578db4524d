"""GC-DPR's argparse command lines, accepted unchanged: each flag maps onto a hydra key through one table.

A command line may mix the two forms (`--batch_size 128 train.learning_rate=2e-5`). A command line that uses
GC-DPR flags gets GC-DPR's defaults for what it does not say (they differ from DPR's hydra defaults: sequence
length 512, seed 0, 3 epochs, no lower-casing unless --do_lower_case), so an old recipe behaves as it did.
torch.distributed.launch's `--local_rank=K` and `--local-rank=K` both work; torchrun's LOCAL_RANK is read
from the environment. DPR's own form, a hydra override behind `--` (`--train.batch_size=4`), works too.
"""
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Flag:
    key: str  # the hydra key
    kind: str = "value"  # value | switch (store_true) | list (one glob -> [glob]) | literal (a Python list) | nargs


ENCODER_FLAGS: Dict[str, Flag] = {
    "encoder_model_type": Flag("encoder.encoder_model_type"),
    "pretrained_model_cfg": Flag("encoder.pretrained_model_cfg"),
    "pretrained_file": Flag("encoder.pretrained_file"),
    "model_file": Flag("model_file"),
    "projection_dim": Flag("encoder.projection_dim"),
    "sequence_length": Flag("encoder.sequence_length"),
    "do_lower_case": Flag("do_lower_case", "switch"),
}

CUDA_FLAGS: Dict[str, Flag] = {
    "no_cuda": Flag("no_cuda", "switch"),
    "local_rank": Flag("local_rank"),
    "local-rank": Flag("local_rank"),
    "fp16": Flag("fp16", "switch"),
    "fp16_opt_level": Flag("fp16_opt_level"),
}

TRAINING_FLAGS: Dict[str, Flag] = {
    "train_file": Flag("train_datasets", "list"),
    "dev_file": Flag("dev_datasets", "list"),
    "batch_size": Flag("train.batch_size"),
    "dev_batch_size": Flag("train.dev_batch_size"),
    "seed": Flag("seed"),
    "adam_eps": Flag("train.adam_eps"),
    "adam_betas": Flag("train.adam_betas"),
    "max_grad_norm": Flag("train.max_grad_norm"),
    "log_batch_step": Flag("train.log_batch_step"),
    "train_rolling_loss_step": Flag("train.train_rolling_loss_step"),
    "weight_decay": Flag("train.weight_decay"),
    "learning_rate": Flag("train.learning_rate"),
    "warmup_steps": Flag("train.warmup_steps"),
    "dropout": Flag("encoder.dropout"),
    "gradient_accumulation_steps": Flag("train.gradient_accumulation_steps"),
    "num_train_epochs": Flag("train.num_train_epochs"),
    "grad_cache": Flag("train.grad_cache", "switch"),
    "q_chunk_size": Flag("train.q_chunk_size"),
    "ctx_chunk_size": Flag("train.ctx_chunk_size"),
}

BIENCODER_FLAGS: Dict[str, Flag] = {
    **ENCODER_FLAGS,
    **CUDA_FLAGS,
    **TRAINING_FLAGS,
    "eval_per_epoch": Flag("train.eval_per_epoch"),
    "global_loss_buf_sz": Flag("global_loss_buf_sz"),
    "fix_ctx_encoder": Flag("encoder.fix_ctx_encoder", "switch"),
    "shuffle_positive_ctx": Flag("shuffle_positive_ctx", "switch"),
    "output_dir": Flag("output_dir"),
    "hard_negatives": Flag("train.hard_negatives"),
    "other_negatives": Flag("train.other_negatives"),
    "train_files_upsample_rates": Flag("train_sampling_rates", "literal"),
    "val_av_rank_start_epoch": Flag("val_av_rank_start_epoch"),
    "val_av_rank_hard_neg": Flag("train.val_av_rank_hard_neg"),
    "val_av_rank_other_neg": Flag("train.val_av_rank_other_neg"),
    "val_av_rank_bsz": Flag("train.val_av_rank_bsz"),
    "val_av_rank_max_qs": Flag("train.val_av_rank_max_qs"),
    "checkpoint_file_name": Flag("checkpoint_file_name"),
}

# GC-DPR's argparse defaults where they differ from the hydra configuration's.
BIENCODER_GC_DEFAULTS: Dict[str, str] = {
    "seed": "0",
    "encoder.sequence_length": "512",
    "do_lower_case": "false",
    "train.num_train_epochs": "3",
    "val_av_rank_start_epoch": "10000",
    "global_loss_buf_sz": "150000",
}

# hydra's own command-line options pass through untouched; these take a value as the next argument.
HYDRA_OPTIONS_WITH_VALUE = {"--cfg", "-c", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                            "--package", "-p", "--experimental-rerun", "--info", "-i"}
HYDRA_SWITCHES = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r",
                  "--shell-completion", "-sc"}


class LegacyFlagError(SystemExit):
    pass


def quote(value: str) -> str:
    """A hydra override value: numbers and booleans as they are, anything else single-quoted."""
    lowered = value.lower()
    if lowered in ("true", "false", "null"):
        return lowered
    try:
        float(value)
        return value
    except ValueError:
        pass
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _literal_list(value: str) -> str:
    import ast

    try:
        items = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise LegacyFlagError(f"expected a Python list such as \"[1,2,1]\", got {value!r}") from e
    items = items if isinstance(items, (list, tuple)) else [items]
    return "[" + ",".join(quote(str(v)) for v in items) + "]"


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def translate_argv(
    argv: Sequence[str],
    flags: Mapping[str, Flag],
    gc_defaults: Mapping[str, str],
    config_keys: Iterable[str],
) -> List[str]:
    """hydra arguments for `argv` (without the program name). Raises LegacyFlagError for an unknown flag."""
    config_keys = set(config_keys)
    hydra_args: List[str] = []
    overrides: List[str] = []
    used_legacy = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        if name in HYDRA_SWITCHES or name in HYDRA_OPTIONS_WITH_VALUE:
            hydra_args.append(arg)
            if name in HYDRA_OPTIONS_WITH_VALUE and not inline and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                hydra_args.append(argv[i + 1])
                i += 1
            i += 1
            continue
        if not arg.startswith("--"):
            overrides.append(arg)
            i += 1
            continue
        flag_name = name[2:]
        flag = flags.get(flag_name)
        if flag is None:
            if inline or "=" in arg:
                if "." in flag_name or flag_name.lstrip("+~") in config_keys:
                    overrides.append(arg[2:])  # DPR's form: a hydra override behind "--"
                    i += 1
                    continue
            valid = ", ".join("--" + f for f in sorted(flags))
            raise LegacyFlagError(f"unknown option '{name}'.\nValid options: {valid}\nor hydra overrides key=value")
        if flag_name not in ("local_rank", "local-rank"):
            used_legacy = True
        if flag.kind == "switch":
            overrides.append(f"{flag.key}=true")
            i += 1
            continue
        if flag.kind == "nargs":
            values = [inline] if inline else []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
                values.append(argv[i + 1])
                i += 1
            if not values:
                raise LegacyFlagError(f"option '{name}' needs at least one value")
            overrides.append(f"{flag.key}=[{','.join(quote(v) for v in values)}]")
            i += 1
            continue
        if inline:
            value = inline
        elif i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        else:
            raise LegacyFlagError(f"option '{name}' needs a value")
        if flag.kind == "list":
            overrides.append(f"{flag.key}=[{quote(value)}]")
        elif flag.kind == "literal":
            overrides.append(f"{flag.key}={_literal_list(value)}")
        else:
            overrides.append(f"{flag.key}={quote(value)}")
        i += 1
    if used_legacy:
        given = {_override_key(o) for o in overrides}
        overrides = [f"{k}={v}" for k, v in gc_defaults.items() if k not in given] + overrides
    return hydra_args + overrides


def rewrite_sys_argv(
    flags: Mapping[str, Flag], gc_defaults: Mapping[str, str], config_keys: Iterable[str], argv: Optional[List[str]] = None
) -> None:
    """Replace sys.argv[1:] by its hydra form before @hydra.main reads it; a bad flag exits with code 2."""
    argv = sys.argv if argv is None else argv
    try:
        argv[1:] = translate_argv(argv[1:], flags, gc_defaults, config_keys)
    except LegacyFlagError as e:
        print(f"{argv[0]}: error: {e.code}", file=sys.stderr)
        raise SystemExit(2) from None


def config_top_level_keys(config_dir: str, config_name: str) -> Tuple[str, ...]:
    """Keys of a primary config file and the names of its config groups, for recognising `--key=value`."""
    import os

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(config_dir, config_name + ".yaml"))
    groups = [d for d in os.listdir(config_dir) if os.path.isdir(os.path.join(config_dir, d))]
    return tuple(k for k in cfg.keys() if k != "defaults") + tuple(groups)
