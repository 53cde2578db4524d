"""One encoder for inference, from a DPR checkpoint or straight from a pretrained model directory, with the encoder
spec it must be used with (the configured one, overridden by the checkpoint's saved settings as in DPR)."""
import contextlib
import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from dpr.foundation import checkpoints
from dpr.foundation.errors import UserInputError
from dpr.models.biencoder import search_vectors
from dpr.models.encoder_spec import EncoderSpec, check_fits_model
from dpr.models.hf_encoder import (
    encode, encoder_from_config, first_token_last_layer, load_tokenizer, resolve_pretrained_path,
)

logger = logging.getLogger(__name__)

# Which half of a bi-encoder checkpoint each encoder_type means.
CHECKPOINT_PREFIXES = {"ctx": "ctx_model.", "question": "question_model."}
# Values read from each tensor for the fingerprint: training moves every weight, so a sample sees any change.
_FINGERPRINT_SAMPLE = 1024


@dataclass
class InferenceEncoder:
    """An encoder in eval mode, its tokenizer, the spec its vectors follow, and `weights`, a fingerprint of the
    model it came from (the whole checkpoint, both towers, or the pretrained encoder) that tells whether two
    sets of vectors came from the same model."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: EncoderSpec
    weights: str

    def search_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The vectors an inner-product index searches: pooled as the spec says, L2-normalised for cosine. With
        [CLS] pooling the last layer computes the [CLS] position only (`first_token_last_layer`)."""
        last_layer = first_token_last_layer(self.model) if self.spec.pooling == "cls" else contextlib.nullcontext()
        with last_layer:
            _, pooled = encode(self.model, input_ids, attention_mask, pooling=self.spec.pooling)
        return search_vectors(pooled.float(), self.spec.similarity)


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A cheap, deterministic fingerprint of a state dict: names, shapes, dtypes and up to 1,024 evenly spaced
    values of each tensor, hashed. Equal on any machine for equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLE)
        sample = flat[::step][:_FINGERPRINT_SAMPLE].contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return "blake2b:" + digest.hexdigest()


class PretrainedWeightsError(UserInputError):
    """A pretrained model directory whose weights file cannot be loaded safely."""


def _pretrained_encoder(config, path: str, projection_dim: int) -> PreTrainedModel:
    """The pretrained model at `path`; torch's weights-only load refuses a pickled payload in `pytorch_model.bin`,
    and the refusal becomes one line naming the file (torch's own message names neither file nor way out)."""
    try:
        return encoder_from_config(config, path, projection_dim)
    except pickle.UnpicklingError as e:
        weights = [str(file) for file in sorted(Path(path).glob("*.bin"))] or [path]
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__).strip()
        raise PretrainedWeightsError(
            f"{', '.join(weights)}: refused to load the pretrained weights, they hold more than tensors (loading "
            f"them could run code from the file: {reason}); use weights from a trusted source, e.g. as "
            "model.safetensors") from e


def load_inference_encoder(
    configured: EncoderSpec, encoder_type: str = "ctx", model_file: Optional[str] = None, trust: bool = False
) -> InferenceEncoder:
    """With `model_file`, the checkpoint's encoder settings override `configured` (as in DPR) and the weights of
    the requested half are loaded: `ctx_model.*` for ctx, `question_model.*` for question (DPR loads ctx weights
    for both, DPR #180). Without it, the pretrained model of `configured.pretrained_model_cfg` is used as is.
    `trust`: the trust_checkpoint option of `checkpoints.load_checkpoint`."""
    if encoder_type not in CHECKPOINT_PREFIXES:
        raise ValueError(f"encoder_type must be one of {sorted(CHECKPOINT_PREFIXES)}, not '{encoder_type}'")
    spec, state, fingerprint = configured, None, None
    if model_file:
        ckpt = checkpoints.load_checkpoint(model_file, trust=trust)
        spec = configured.with_checkpoint_params(ckpt.encoder_params)
        fingerprint = weights_fingerprint(ckpt.model_dict)
        state = checkpoints.strip_prefix(ckpt.model_dict, CHECKPOINT_PREFIXES[encoder_type])
        if not state:
            raise checkpoints.CheckpointError(
                f"{model_file} has no '{CHECKPOINT_PREFIXES[encoder_type]}*' weights: is it a bi-encoder checkpoint?"
            )
    path = resolve_pretrained_path(spec.pretrained_model_cfg)
    config = AutoConfig.from_pretrained(path)
    check_fits_model(spec, getattr(config, "max_position_embeddings", None))
    if state is None:
        model = _pretrained_encoder(config, path, spec.projection_dim)
        fingerprint = weights_fingerprint(model.state_dict())
    else:
        model = encoder_from_config(config, None, spec.projection_dim)
        checkpoints.load_model_state(model, state)
        logger.info("Loaded %s encoder weights from %s", encoder_type, model_file)
    model.eval()
    return InferenceEncoder(model, load_tokenizer(spec.pretrained_model_cfg, spec.do_lower_case), spec, fingerprint)
