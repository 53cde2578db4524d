"""Bad data files are refused with the file and the place named, never read into silently wrong answers: repeated
passage ids, rows split by a stray tab, bytes that are not UTF-8, gzip bytes under a plain name, truncated gzip,
byte order marks, questions without answers and empty question files."""
import gzip
import json
import logging

import pytest
from omegaconf import OmegaConf

from dpr.data import data_files
from dpr.data.biencoder_data import load_biencoder_samples
from dpr.data.ctx_sources import CtxSource, iter_sources, load_passage_subset
from dpr.data.data_files import DataFileError, expand_glob, first_invalid_utf8_offset, open_text
from dpr.data.passages import count_passages, iter_passage_shard, iter_passages, load_passages
from dpr.data.qa_data import QASample, read_qa_file
from dpr.data.resources import DataPathError, resolve_dataset
from dpr.foundation.errors import UserInputError

HEADER = "id\ttext\ttitle\n"


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


# ------------------------------------------------------------------------------------------- repeated passage ids
@pytest.fixture
def duplicated(tmp_path):
    """Passage 2 appears twice (lines 3 and 5), with different texts."""
    return write(tmp_path / "psgs.tsv", HEADER + "1\tfirst\tA\n2\tsecond\tB\n3\tthird\tC\n2\tanswer is here\tD\n")


@pytest.mark.parametrize("read", [
    lambda path: list(iter_passages(path)),
    count_passages,
    load_passages,
    lambda path: list(iter_sources([CtxSource(str(path), "wiki:")])),
    lambda path: load_passage_subset([CtxSource(str(path), "wiki:")], ["wiki:1"]),
], ids=["iter_passages", "count_passages", "load_passages", "iter_sources", "load_passage_subset"])
def test_repeated_passage_id_names_the_id_and_both_lines(duplicated, read):
    with pytest.raises(DataFileError, match=r"psgs\.tsv, line 5: passage id '2' is already used on line 3;"):
        read(duplicated)


def test_shards_are_planned_from_a_checked_count(duplicated):
    with pytest.raises(DataFileError, match="passage id '2'"):
        list(iter_passage_shard(duplicated, 0, 2))  # no total given: the counting pass checks the whole file


def test_id_repeated_across_sources_names_both_files(tmp_path):
    first = write(tmp_path / "a.tsv", HEADER + "1\tx\tA\n7\ty\tB\n")
    second = write(tmp_path / "b.tsv", HEADER + "7\tz\tC\n")
    with pytest.raises(DataFileError, match=r"b\.tsv, line 2: passage id '7' is already used on line 3 of .*a\.tsv"):
        list(iter_sources([CtxSource(str(first), "wiki:"), CtxSource(str(second), "wiki:")]))
    # under different prefixes the ids differ
    ids = [p.id for p in iter_sources([CtxSource(str(first), "a:"), CtxSource(str(second), "b:")])]
    assert ids == ["a:1", "a:7", "b:7"]


def test_equal_hashes_of_different_ids_are_not_duplicates(tmp_path, monkeypatch):
    path = write(tmp_path / "psgs.tsv", HEADER + "1\tx\tA\n2\ty\tB\n3\tz\tC\n")
    monkeypatch.setattr("dpr.data.passages.hash", lambda _: 42, raising=False)  # every id collides
    assert [p.id for p in iter_passages(path)] == ["1", "2", "3"]


def test_multi_line_texts_are_refused_at_the_starting_line(tmp_path):
    """DPR's psgs_w100.tsv holds one passage per line: a quoted text running across lines is refused where it
    starts, not read as one passage."""
    path = write(tmp_path / "psgs.tsv", HEADER + '1\t"two\nlines"\tA\n2\tagain\tB\n')
    with pytest.raises(DataFileError, match=r"psgs\.tsv, line 2: a double-quoted text opened here runs across "
                                            r"lines 2-3"):
        count_passages(path)


# ------------------------------------------------------------------------------------------- malformed rows
def test_unquoted_tab_in_a_text_is_refused(tmp_path):
    path = write(tmp_path / "psgs.tsv", HEADER + "1\tfine\tA\n2\ta text\twith a tab\tTitle\n")
    with pytest.raises(DataFileError, match=r"psgs\.tsv, line 3: expected 3 tab-separated fields .* got 4; a tab "
                                            r"inside a text needs the text in double quotes"):
        list(iter_passages(path))


def test_short_row_names_the_line(tmp_path):
    path = write(tmp_path / "psgs.tsv", HEADER + "1\tfine\tA\n2\tno title\n")
    with pytest.raises(DataFileError, match=r"psgs\.tsv, line 3: expected 3 .* got 2"):
        list(iter_passages(path))


# ------------------------------------------------------------------------------------------- encodings
def test_non_utf8_passages_name_the_byte_offset(tmp_path):
    content = (HEADER + "1\tcaf").encode() + "é".encode("latin-1") + b"\tA\n"
    path = write(tmp_path / "psgs.tsv", content)
    with pytest.raises(DataFileError, match=rf"psgs\.tsv: byte {len(HEADER) + 5} is not UTF-8 text"):
        list(iter_passages(path))


def test_non_utf8_in_a_gzipped_file_names_the_decompressed_offset(tmp_path):
    path = write(tmp_path / "q.qa.csv.gz", gzip.compress(b"q\t['a']\nbad \xff\t['b']\n"))
    with pytest.raises(DataFileError, match=r"q\.qa\.csv\.gz: byte 12 of the decompressed data is not UTF-8"):
        read_qa_file(path)


def test_non_utf8_biencoder_json_names_the_byte_offset(tmp_path):
    before = b'[{"question": "caf'
    path = write(tmp_path / "train.json", before + b'\xe9"}]')
    with pytest.raises(DataFileError, match=rf"train\.json: byte {len(before)} is not UTF-8 text"):
        load_biencoder_samples([str(path)])


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_gzip_bytes_under_a_plain_name_say_so(tmp_path, name):
    path = write(tmp_path / name, gzip.compress(b'[{"question": "q"}]'))
    with pytest.raises(DataFileError, match=rf"{name}: byte 1 is not UTF-8 text: the file starts with gzip's magic "
                                            rf"bytes.*name it .*{name}\.gz"):
        load_biencoder_samples([str(path)])


def test_truncated_gzip_is_named(tmp_path):
    whole = gzip.compress((HEADER + "".join(f"{i}\ttext {i}\tT\n" for i in range(1, 500))).encode())
    path = write(tmp_path / "psgs.tsv.gz", whole[: len(whole) // 2])
    with pytest.raises(DataFileError, match=r"psgs\.tsv\.gz: not a whole gzip file"):
        count_passages(path)


def test_invalid_offset_is_found_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "_CHUNK_SIZE", 3)
    path = write(tmp_path / "x.txt", "aéé".encode() + b"\xc3(")  # characters split across chunks, then a bad pair
    assert first_invalid_utf8_offset(path) == 5
    assert first_invalid_utf8_offset(write(tmp_path / "ok.txt", "aééé")) is None
    assert first_invalid_utf8_offset(write(tmp_path / "cut.txt", "aé".encode()[:2])) == 1  # ends mid-character


def test_decoding_errors_are_user_errors(tmp_path):
    path = write(tmp_path / "psgs.tsv", b"\xff")
    with pytest.raises(UserInputError):
        with open_text(path) as stream:
            stream.read()


# ------------------------------------------------------------------------------------------- byte order marks
def test_bom_in_passages_is_not_a_passage(tmp_path):
    path = write(tmp_path / "psgs.tsv", "\ufeff" + HEADER + "1\tx\tA\n")
    assert list(iter_passages(path)) == [("1", "x", "A")]


def test_bom_in_gzipped_passages(tmp_path):
    path = write(tmp_path / "psgs.tsv.gz", gzip.compress(("\ufeff" + HEADER + "1\tx\tA\n").encode()))
    assert [p.id for p in iter_passages(path)] == ["1"]


def test_bom_in_question_files(tmp_path):
    csv_path = write(tmp_path / "q.qa.csv", "\ufeffwho?\t['me']\n")
    jsonl_path = write(tmp_path / "q.jsonl", "\ufeff" + json.dumps({"question": "who?", "answer": "me"}) + "\n")
    assert read_qa_file(csv_path) == read_qa_file(jsonl_path) == [QASample("who?", ["me"])]


def test_bom_in_biencoder_json(tmp_path):
    record = {"question": "q", "answers": ["a"], "positive_ctxs": [{"text": "t", "title": "T", "passage_id": 5}]}
    path = write(tmp_path / "train.json", "\ufeff" + json.dumps([record]))
    [sample] = load_biencoder_samples([str(path)])
    assert sample.positive_passages[0] == ("5", "t", "T")


# ------------------------------------------------------------------------------------------- questions
def test_questions_without_answers_are_warned_about_by_line(tmp_path, caplog):
    path = write(tmp_path / "q.qa.csv", "a?\t['x']\nb?\t[]\nc?\t['y']\nd?\t[]\n")
    with caplog.at_level(logging.WARNING, logger="dpr.data.qa_data"):
        samples = read_qa_file(path)
    assert [s.answers for s in samples] == [["x"], [], ["y"], []]  # kept: they count as misses, as in DPR
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert warnings[0].startswith(f"{path}, line 2: the question 'b?' has no answer")
    assert warnings[1].startswith(f"{path}, line 4:")
    assert warnings[2] == f"{path}: 2 of 4 questions have no answer; they count as misses"


@pytest.mark.parametrize("name, content", [("q.qa.csv", ""), ("q.qa.csv", "\n\n"), ("q.jsonl", "\n")])
def test_empty_question_file_is_an_error(tmp_path, name, content):
    with pytest.raises(DataFileError, match=rf"{name}: no questions in the file"):
        read_qa_file(write(tmp_path / name, content))


# ------------------------------------------------------------------------------------------- names and paths
def test_glob_is_in_natural_order_and_files_only(tmp_path):
    for name in ("emb_10", "emb_2", "emb_1"):
        write(tmp_path / name, "x")
    (tmp_path / "emb_3").mkdir()
    assert expand_glob(tmp_path / "emb_*") == [str(tmp_path / f"emb_{i}") for i in (1, 2, 10)]
    assert expand_glob(tmp_path / "nothing_*") == []
    bracketed = write(tmp_path / "a[1].tsv", "x")
    assert expand_glob(bracketed) == [str(bracketed)]  # a file's own name is not read as a glob


def test_resolve_dataset_entry_path_and_errors(tmp_path):
    data = write(tmp_path / "dev.qa.csv", "q\t['a']\n")
    group = OmegaConf.create({"mine": {"file": str(data), "id_col": 2}, "broken": {"id_prefix": "x"}})
    named = resolve_dataset("mine", group, None)
    assert named.files == [str(data)] and dict(named.options) == {"id_col": 2}
    assert resolve_dataset(str(data), group, None).files == [str(data)]
    assert resolve_dataset(str(tmp_path / "*.csv"), None).options == {}
    with pytest.raises(DataPathError, match="'broken' has no 'file'"):
        resolve_dataset("broken", group, None)
    with pytest.raises(DataPathError, match="neither an existing file"):
        resolve_dataset("typo", group, None)
