"""GC-DPR's saved question encodings (`q_encoding_path`: a torch tensor file, the format GC-DPR writes and reads),
with what made them recorded beside them, so that vectors of another model or of other questions are never
searched.

The vectors file `q.pt` gets the hidden JSON record `.q.pt.provenance.json` (as the embedding shards do):

    format, version   "dpr-question-encodings", 1
    model             the encoder's record (`shard_provenance.model_record`: checkpoint path, weights fingerprint,
                      encoder params), compared with the shards' on the model keys `check_question_encoder` uses
    questions         count and hash of every normalised question text (compared: a full check), and the identities
                      of the question files they were read from (for information only: paths differ between
                      machines, and the texts' hash already says what was encoded)
    vectors_sha256    the vectors file it describes: a record left beside other vectors (a write killed between
                      the two files) is refused rather than believed

Both files are written atomically, the record first (`save_question_vectors`). Vectors without a record (written by
GC-DPR) are used as they are, with an info line.
"""
import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dpr.data.embeddings_io import refuse_non_finite
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output
from dpr.foundation.provenance import differing_field, file_identity, read_record, sha256_of_file
from dpr.indexing.shard_provenance import MODEL_KEYS, OPTIONAL_MODEL_KEYS

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
FORMAT = "dpr-question-encodings"
VERSION = 1
_QUESTION_KEYS = ("count", "hash")


class QuestionEncodingsError(UserInputError):
    """Saved question encodings that are unreadable, or not of the model or questions being retrieved."""


def record_path(vectors_path: PathLike) -> Path:
    vectors_path = Path(vectors_path)
    return vectors_path.parent / f".{vectors_path.name}.provenance.json"


def questions_record(questions: Sequence[str], qa_files: Sequence[PathLike] = ()) -> dict:
    digest = hashlib.blake2b(digest_size=16)
    for question in questions:
        digest.update(question.encode("utf-8") + b"\0")
    return {"count": len(questions), "hash": "blake2b:" + digest.hexdigest(),
            "qa_files": [file_identity(path) for path in qa_files]}


def save_question_vectors(vectors: np.ndarray, path: PathLike, model: dict, questions: dict) -> None:
    """The vectors as GC-DPR saves them (torch.save of a float tensor) and their record, each file appearing under
    its name only when complete. The record goes first, naming the new vectors' hash: a kill between the two
    leaves the old vectors beside a record that refuses them, never new vectors without a record."""
    with atomic_output(path) as vectors_temp:
        torch.save(torch.from_numpy(vectors), vectors_temp)
        record = {"format": FORMAT, "version": VERSION, "model": model, "questions": questions,
                  "vectors_sha256": sha256_of_file(vectors_temp)}
        with atomic_output(record_path(path)) as record_temp, open(record_temp, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2, sort_keys=True)
    logger.info("saved question encodings %s to %s", tuple(vectors.shape), path)


def _read_vectors(path: PathLike) -> np.ndarray:
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses any global outside plain tensors
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise QuestionEncodingsError(
            f"q_encoding_path={path}: refused to load it, it holds more than a tensor (loading it could run code "
            f"from the file: {reason}); give question encodings saved by dense_retriever.py, or delete it to "
            "re-encode the questions") from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise QuestionEncodingsError(
            f"q_encoding_path={path}: truncated or not a torch file of question encodings ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); delete it to re-encode the questions") from e
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        raise QuestionEncodingsError(
            f"q_encoding_path={path} holds {type(tensor).__name__}"
            f"{' of shape ' + str(tuple(tensor.shape)) if isinstance(tensor, torch.Tensor) else ''}, not a float "
            "matrix of question encodings; delete it to re-encode the questions")
    vectors = tensor.numpy()
    refuse_non_finite(vectors, f"q_encoding_path={path}", way_out="delete it to re-encode the questions (in fp32 "
                      "or bf16: fp16 overflow makes such vectors)")
    return vectors


def _read_record(path: PathLike) -> Optional[dict]:
    return read_record(record_path(path), FORMAT, QuestionEncodingsError, f"question-encodings record of {path}",
                       "delete both to re-encode")


def load_question_vectors(path: PathLike, questions: dict, shards_model: Optional[tuple[Path, dict]]) -> np.ndarray:
    """The saved vectors of `questions` (a `questions_record`), refused when their record says they were made by
    another model than the shards' (`shards_model`: a shard or saved index and its record) or for other
    questions."""
    vectors = _read_vectors(path)
    record = _read_record(path)
    if record is None:
        logger.info("question encodings %s have no record (e.g. saved by GC-DPR): used as they are", path)
    else:
        if record.get("vectors_sha256") != sha256_of_file(path):
            raise QuestionEncodingsError(
                f"{record_path(path)} describes other vectors than q_encoding_path={path} (an interrupted write?): "
                "delete both to re-encode the questions")
        if shards_model is not None:
            changed = differing_field(shards_model[1], record, keys=MODEL_KEYS, when_both=OPTIONAL_MODEL_KEYS)
            if changed is not None:
                raise QuestionEncodingsError(
                    f"q_encoding_path={path} was encoded by another model than the one that embedded "
                    f"{shards_model[0]}: {changed} (shards vs question encodings). Re-encode the questions with "
                    "the shards' model (re_encode_q=true) or give another q_encoding_path")
        changed = differing_field(record["questions"], questions, keys=_QUESTION_KEYS)
        if changed is not None:
            raise QuestionEncodingsError(
                f"q_encoding_path={path} holds the encodings of other questions than these: questions.{changed} "
                "(saved vs now). Re-encode them (re_encode_q=true) or give another q_encoding_path")
    if len(vectors) != questions["count"]:
        raise QuestionEncodingsError(
            f"q_encoding_path={path} holds {len(vectors)} question vectors for {questions['count']} questions")
    logger.info("loaded question encodings %s from %s", tuple(vectors.shape), path)
    return vectors
