import csv
import gzip

import pytest

from dpr.data.data_files import DataFileError
from dpr.data.passages import (
    Passage,
    count_passages,
    iter_passage_shard,
    iter_passages,
    load_passages,
    shard_range,
)

ROWS = [
    ("1", 'A "quoted" text,\twith a tab', "Title One"),
    ("2", '"Wrapped in quotes"', "Title Two"),
    ("3", "Title and text, 'single' quotes", "Title Three"),
    ("4", "plain", ""),
]


def write_tsv(path, rows, header=True):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as writer:
        tsv = csv.writer(writer, delimiter="\t")
        if header:
            tsv.writerow(["id", "text", "title"])
        tsv.writerows(rows)
    return path


@pytest.mark.parametrize("name", ["psgs.tsv", "psgs.tsv.gz"])
def test_iter_passages_reads_csv_quoting_and_strips_quotes(tmp_path, name):
    path = write_tsv(tmp_path / name, ROWS)
    passages = list(iter_passages(path, id_prefix="wiki:"))
    assert passages == [
        Passage("wiki:1", 'A "quoted" text,\twith a tab', "Title One"),
        Passage("wiki:2", "Wrapped in quotes", "Title Two"),  # DPR's text.strip('"')
        Passage("wiki:3", "Title and text, 'single' quotes", "Title Three"),
        Passage("wiki:4", "plain", ""),
    ]
    assert count_passages(path) == 4


def test_file_without_header_keeps_first_row(tmp_path):
    path = write_tsv(tmp_path / "psgs.tsv", ROWS, header=False)
    assert [passage.id for passage in iter_passages(path)] == ["1", "2", "3", "4"]


def test_short_row_is_an_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("id\ttext\ttitle\n1\tonly text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv"):
        list(iter_passages(path))


@pytest.mark.parametrize("reader", [lambda path: list(iter_passages(path)), count_passages])
def test_unbalanced_quote_is_refused_naming_the_line_where_it_started(tmp_path, reader):
    """A text that opens a double quote and never closes it would swallow the following rows into one passage
    (60 rows gave 51 vectors); a row whose quoting runs across lines is refused at the line where it began."""
    rows = [(str(i), f"text {i}", f"title {i}") for i in range(1, 61)]
    lines = ["id\ttext\ttitle"] + ["\t".join(row) for row in rows]
    lines[5] = '5\t"an unbalanced quote\ttitle 5'
    path = tmp_path / "psgs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"psgs.tsv, line 6: .*quot"):
        reader(path)


def test_iter_passages_is_lazy(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_text("id\ttext\ttitle\n1\tfine\tT\n2\tbroken\n", encoding="utf-8")
    passages = iter_passages(path)
    assert next(passages).id == "1"  # the broken row further on is not read yet


@pytest.mark.parametrize("n", [0, 1, 2, 7, 9, 10, 11, 100])
@pytest.mark.parametrize("num_shards", [1, 3, 4, 50])
def test_shards_cover_every_row_exactly_once(n, num_shards):
    ranges = [shard_range(n, shard_id, num_shards) for shard_id in range(num_shards)]
    covered = [row for start, end in ranges for row in range(start, end)]
    assert covered == list(range(n))
    assert all(end - start <= -(-n // num_shards) for start, end in ranges)


def test_shard_range_known_splits():
    assert [shard_range(10, i, 3) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [shard_range(7, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 7)]
    assert [shard_range(1, i, 3) for i in range(3)] == [(0, 1), (1, 1), (1, 1)]
    assert [shard_range(0, i, 3) for i in range(3)] == [(0, 0)] * 3


@pytest.mark.parametrize("shard_id, num_shards", [(3, 3), (-1, 3), (0, 0)])
def test_shard_range_rejects_bad_shards(shard_id, num_shards):
    with pytest.raises(ValueError):
        shard_range(5, shard_id, num_shards)


def test_iter_passage_shard_concatenates_to_whole_file(tmp_path):
    rows = [(str(i), f"text {i}", f"title {i}") for i in range(1, 11)]
    path = write_tsv(tmp_path / "psgs.tsv", rows)
    shards = [list(iter_passage_shard(path, shard_id, 3)) for shard_id in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 2]
    assert [p for shard in shards for p in shard] == list(iter_passages(path))
    second_shard = list(iter_passage_shard(path, 1, 3, id_prefix="wiki:", total=10))
    assert second_shard[0] == Passage("wiki:5", "text 5", "title 5")


def test_load_passages(tmp_path):
    path = write_tsv(tmp_path / "psgs.tsv", ROWS)
    passages = load_passages(path, id_prefix="wiki:")
    assert passages["wiki:2"] == ("Wrapped in quotes", "Title Two")
    assert len(passages) == 4


def test_real_squad_open_passages(shared_data):
    path = shared_data / "squad_open" / "psgs_plus_wikitext2.tsv"
    assert count_passages(path) == 4131
    first = next(iter_passages(path, "wiki:"))
    assert first.id == "wiki:1" and first.text.startswith("Super Bowl 50 was an American football game")
    shards = [list(iter_passage_shard(path, shard_id, 4, total=4131)) for shard_id in range(4)]
    assert [len(shard) for shard in shards] == [1033, 1033, 1033, 1032]
    assert shards[3][-1].id == "102064"  # WikiText distractors are numbered from 100001
