"""One encoder for inference, from a DPR checkpoint or straight from a pretrained model directory."""
import logging
from typing import Optional, Tuple

from omegaconf import DictConfig
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from dpr.models.hf_encoder import encoder_from_config, load_tokenizer, resolve_pretrained_path
from dpr.foundation import checkpoints
from dpr.models.encoder_spec import apply_encoder_params

logger = logging.getLogger(__name__)

# Which half of a bi-encoder checkpoint each encoder_type means.
CHECKPOINT_PREFIXES = {"ctx": "ctx_model.", "question": "question_model."}


def load_inference_encoder(
    cfg: DictConfig, encoder_type: str = "ctx", model_file: Optional[str] = None
) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(encoder in eval mode, tokenizer). With `model_file`, the checkpoint's encoder settings override
    cfg.encoder (as in DPR) and the weights of the requested half are loaded: `ctx_model.*` for ctx,
    `question_model.*` for question (DPR loads ctx weights for both, DPR #180). Without it, the pretrained
    model of cfg.encoder.pretrained_model_cfg is used as is."""
    if encoder_type not in CHECKPOINT_PREFIXES:
        raise ValueError(f"encoder_type must be one of {sorted(CHECKPOINT_PREFIXES)}, not '{encoder_type}'")
    state = None
    if model_file:
        ckpt = checkpoints.load_checkpoint(model_file, trust=bool(cfg.get("trust_checkpoint", False)))
        apply_encoder_params(cfg, ckpt.encoder_params)
        state = checkpoints.strip_prefix(ckpt.model_dict, CHECKPOINT_PREFIXES[encoder_type])
        if not state:
            raise ValueError(f"{model_file} has no '{CHECKPOINT_PREFIXES[encoder_type]}*' weights")
    path = resolve_pretrained_path(cfg.encoder.pretrained_model_cfg)
    config = AutoConfig.from_pretrained(path)
    projection_dim = cfg.encoder.get("projection_dim") or 0
    if state is None:
        model = encoder_from_config(config, path, projection_dim)
    else:
        model = encoder_from_config(config, None, projection_dim)
        checkpoints.load_model_state(model, state)
        logger.info("Loaded %s encoder weights from %s", encoder_type, model_file)
    model.eval()
    return model, load_tokenizer(cfg.encoder.pretrained_model_cfg, cfg.get("do_lower_case", True))
