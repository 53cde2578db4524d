"""One encoder for inference, from a DPR checkpoint or straight from a pretrained model directory, with the encoder
spec it must be used with (the configured one, overridden by the checkpoint's saved settings as in DPR)."""
import contextlib
import copy
import dataclasses
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
from dpr.models.encoder_spec import EncoderConfigError, EncoderSpec, check_fits_model
from dpr.models.hf_encoder import (
    TokenizerError, check_same_tokenizer, encode, encoder_from_config, first_token_last_layer, load_tokenizer,
    resolve_pretrained_path, tokenizer_identity,
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
    weights_sha256: Optional[str] = None  # of every weight (`weights_sha256`): what `weights` samples
    tokenizer_identity: Optional[dict] = None  # `hf_encoder.tokenizer_identity`

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


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a state dict's every weight (with names, shapes and dtypes): `weights_fingerprint` samples
    1,024 values a tensor, which an edit of a few weights passes. The tensors are in memory already: no I/O."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


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
    if model_file:
        ckpt = checkpoints.load_checkpoint(model_file, trust=trust)
        return checkpoint_encoder(ckpt, configured.with_checkpoint_params(ckpt.encoder_params), encoder_type, model_file)
    path = resolve_pretrained_path(configured.pretrained_model_cfg)
    config = AutoConfig.from_pretrained(path)
    check_fits_model(configured, getattr(config, "max_position_embeddings", None))
    model = _pretrained_encoder(config, path, configured.projection_dim)
    state = model.state_dict()
    return _inference_encoder(model, configured, weights_fingerprint(state), weights_sha256(state))


def checkpoint_encoder(
    ckpt: checkpoints.CheckpointState, spec: EncoderSpec, encoder_type: str, model_file: str
) -> InferenceEncoder:
    """The `encoder_type` half of a loaded checkpoint as an InferenceEncoder following `spec` (the checkpoint's
    settings already applied over the configured ones), its fingerprint that of the whole checkpoint. One half
    only: embedding and retrieval need no other (`load_checkpoint_biencoder` reads both, for the exports)."""
    state = _tower_weights(ckpt, encoder_type, model_file)
    config = AutoConfig.from_pretrained(resolve_pretrained_path(spec.pretrained_model_cfg))
    check_fits_model(spec, getattr(config, "max_position_embeddings", None))
    model = _checkpoint_tower(state, encoder_type, config, spec, model_file, "encoder.pretrained_model_cfg")
    logger.info("Loaded %s encoder weights from %s", encoder_type, model_file)
    return _inference_encoder(model, spec, weights_fingerprint(ckpt.model_dict), weights_sha256(ckpt.model_dict),
                              ckpt.encoder_params.get("tokenizer"), f"the checkpoint {model_file}")


def _inference_encoder(model: PreTrainedModel, spec: EncoderSpec, fingerprint: str, full_digest: str,
                       recorded_tokenizer: Optional[dict] = None, recorded_by: Optional[str] = None
                       ) -> InferenceEncoder:
    """`recorded_by` (a checkpoint) recorded `recorded_tokenizer`: a tokenizer that tokenizes otherwise is refused."""
    model.eval()
    tokenizer = load_tokenizer(spec.pretrained_model_cfg, spec.do_lower_case)
    if recorded_by is not None:
        check_same_tokenizer(recorded_tokenizer, tokenizer, resolve_pretrained_path(spec.pretrained_model_cfg),
                             recorded_by)
    return InferenceEncoder(model, tokenizer, spec, fingerprint, full_digest, tokenizer_identity(tokenizer))


@dataclass
class CheckpointBiEncoder:
    """Both towers of a bi-encoder checkpoint in eval mode (one object when the spec shares the encoders), the
    tokenizer and the spec their vectors follow, and the checkpoint they came from."""

    question_model: PreTrainedModel
    ctx_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: EncoderSpec
    checkpoint: checkpoints.CheckpointState

    @property
    def shares_encoders(self) -> bool:
        return self.question_model is self.ctx_model

    def inference_encoders(self) -> dict:
        """{"question": InferenceEncoder, "ctx": InferenceEncoder} of the two towers (one object under both keys
        when they share the encoder), fingerprinted as `checkpoint_encoder` fingerprints them: the same model
        record, so graphs or vectors made from either are accepted beside the other's."""
        model_dict = self.checkpoint.model_dict
        fingerprint, digest = weights_fingerprint(model_dict), weights_sha256(model_dict)
        identity = tokenizer_identity(self.tokenizer)

        def encoder(model: PreTrainedModel) -> InferenceEncoder:
            return InferenceEncoder(model, self.tokenizer, self.spec, fingerprint, digest, identity)

        question = encoder(self.question_model)
        return {"question": question, "ctx": question if self.shares_encoders else encoder(self.ctx_model)}


def load_checkpoint_biencoder(
    checkpoint_path: str, pretrained_model_cfg: Optional[str] = None, trust: bool = False
) -> CheckpointBiEncoder:
    """Both towers of a DPR-format bi-encoder checkpoint (this repository's, hydra DPR's, or a released old-DPR /
    GC-DPR `.cp` file) with the spec its saved encoder_params give. `pretrained_model_cfg` (a local directory, or
    `minilm`) replaces the model the checkpoint names: the released files name `bert-base-uncased`, which is not
    here offline; its config and tokenizer suffice, the weights come from the checkpoint. Every mistake the user
    can fix (no model named, no config or tokenizer there, weights that do not fit it) is a UserInputError."""
    ckpt = checkpoints.load_checkpoint(checkpoint_path, trust=trust)
    name = pretrained_model_cfg or (ckpt.encoder_params.get("encoder") or {}).get("pretrained_model_cfg")
    if not name:
        raise EncoderConfigError(
            f"{checkpoint_path} names no pretrained model: give --pretrained_model_cfg, the directory of the BERT "
            "it was trained from (its config and tokenizer suffice)")
    spec = EncoderSpec(str(name)).with_checkpoint_params(ckpt.encoder_params)
    if pretrained_model_cfg:
        spec = dataclasses.replace(spec, pretrained_model_cfg=pretrained_model_cfg)
    if spec.encoder_model_type != "hf_bert":
        raise EncoderConfigError(
            f"{checkpoint_path} has encoder_model_type={spec.encoder_model_type}: only hf_bert encoders (a "
            "transformers AutoModel; DPR's fairseq and pytext encoders are not) load here")
    path = resolve_pretrained_path(spec.pretrained_model_cfg)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EncoderConfigError(
            f"cannot read the model configuration of '{spec.pretrained_model_cfg}' ({_first_line(e)}); give "
            "--pretrained_model_cfg, a local directory with the config and tokenizer of the model the checkpoint "
            "was trained from") from e
    check_fits_model(spec, getattr(config, "max_position_embeddings", None))
    try:
        tokenizer = load_tokenizer(spec.pretrained_model_cfg, spec.do_lower_case)
    except TokenizerError as e:
        raise TokenizerError(
            f"'{spec.pretrained_model_cfg}', the model {checkpoint_path} names, has no tokenizer ({_first_line(e)}): "
            "give --pretrained_model_cfg, a directory holding the tokenizer files of the model it was trained "
            "from") from e
    except (OSError, ValueError, TypeError) as e:
        raise TokenizerError(
            f"cannot read the tokenizer of '{spec.pretrained_model_cfg}' ({_first_line(e)}): give "
            "--pretrained_model_cfg, a directory holding the tokenizer files of the model it was trained from") from e
    check_same_tokenizer(ckpt.encoder_params.get("tokenizer"), tokenizer, path, f"the checkpoint {checkpoint_path}")
    def tower(encoder_type: str) -> PreTrainedModel:
        return _checkpoint_tower(_tower_weights(ckpt, encoder_type, checkpoint_path), encoder_type, config, spec,
                                 checkpoint_path)

    question_model = tower("question")
    ctx_model = question_model if spec.share_encoders else tower("ctx")
    return CheckpointBiEncoder(question_model, ctx_model, tokenizer, spec, ckpt)


def _tower_weights(ckpt, encoder_type: str, checkpoint_path: str) -> dict:
    """The `encoder_type` half's weights of a bi-encoder checkpoint, their prefix stripped."""
    state = checkpoints.strip_prefix(ckpt.model_dict, CHECKPOINT_PREFIXES[encoder_type])
    if not state:
        raise checkpoints.CheckpointError(
            f"{checkpoint_path} has no '{CHECKPOINT_PREFIXES[encoder_type]}*' weights: is it a bi-encoder checkpoint?")
    return state


def _checkpoint_tower(state: dict, encoder_type: str, config, spec: EncoderSpec, checkpoint_path: str,
                      option: str = "--pretrained_model_cfg") -> PreTrainedModel:
    """The model of `config` holding a tower's weights, in eval mode; weights that do not fit it are refused in
    one line naming `option`, the way to name the model they were trained from."""
    model = encoder_from_config(copy.deepcopy(config), None, spec.projection_dim)
    try:
        checkpoints.load_model_state(model, state)
    except RuntimeError as e:  # load_model_state's "does not fit": another architecture than the one named
        raise EncoderConfigError(
            f"the {encoder_type} weights of {checkpoint_path} do not fit '{spec.pretrained_model_cfg}' "
            f"({_first_line(e)}): give {option}, the model it was trained from") from e
    return model.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
