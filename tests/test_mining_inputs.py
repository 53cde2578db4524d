"""Mining hard negatives goes through `dense_retriever.retrieve`, so it refuses what retrieval refuses."""
import pytest

from dpr.indexing.hard_negatives import mine_hard_negatives
from dpr.indexing.shard_provenance import ShardProvenanceError
from tests.retrieval_helpers import write_passages_tsv
from tests.test_mine_hard_negatives import ALL_PASSAGES, data, mining_config  # noqa: F401 (data: the fixture)


def test_mining_refuses_passages_changed_after_embedding(data, tmp_path):  # noqa: F811
    psgs = tmp_path / "psgs.tsv"
    write_passages_tsv(psgs, [(pid, text[::-1], title) for pid, text, title in ALL_PASSAGES])
    cfg = mining_config(data, tmp_path / "mined.json", ctx_datatsets=f"[{psgs}]")
    with pytest.raises(ShardProvenanceError, match=r"passages file .*psgs.tsv is not the one"):
        mine_hard_negatives(cfg)
    assert not (tmp_path / "mined.json").exists()
