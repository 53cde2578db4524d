"""Records of the finished stages of a multi-stage run (one JSON file per stage, numbered in order), each with its
command and the identity of every file it read, so that a rerun after an interruption skips the stages already
done on the same inputs and runs the others, and every stage after them, again."""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from dpr.foundation.files import atomic_output
from dpr.foundation.provenance import full_identity


class DamagedStageRecordError(ValueError):
    """A record that cannot be read (records are written atomically, but a disk error or a hand edit can still
    leave one unreadable): its stage runs again."""


@dataclass(frozen=True)
class StageRecord:
    name: str
    command: str  # as shown to the user: a change of any argument makes it another stage
    inputs: Dict[str, Optional[dict]]  # path -> full_identity (None: not there)
    seconds: Optional[float]  # None: started and not (yet) finished

    def done_as(self, command: str, inputs: Dict[str, Optional[dict]]) -> bool:
        """This very command finished on these very inputs."""
        return self.same_as(command, inputs) and self.seconds is not None

    def same_as(self, command: str, inputs: Dict[str, Optional[dict]]) -> bool:
        """This very command on these very inputs, finished or not (an interrupted one may resume its outputs)."""
        return self.command == command and self.inputs == inputs


def stage_record_path(folder: Path, position: int) -> Path:
    return folder / f"{position:02d}.json"


def input_identities(paths: Sequence[Optional[Path]], earlier: Optional[Dict[str, Optional[dict]]] = None
                     ) -> Dict[str, Optional[dict]]:
    """The identity of every file a stage reads (`full_identity`: size, mtime, sampled blocks and the sha256 of every
    byte, so an edit that keeps size and mtime is caught; None for a file not there); None paths are skipped. A file
    that is provably the very one an `earlier` identity saw, untouched since, is not read again."""
    earlier = earlier or {}
    return {str(path): full_identity(path, earlier.get(str(path))) if path.is_file() else None
            for path in paths if path is not None}


def read_stage_record(path: Path) -> Optional[StageRecord]:
    """The record at `path`; None when there is none; DamagedStageRecordError when it cannot be read."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, not UTF-8
        raise DamagedStageRecordError(f"{path} is damaged ({e})") from None
    if not (isinstance(record, dict) and isinstance(record.get("command"), str)
            and isinstance(record.get("inputs"), dict)
            and isinstance(record.get("seconds", ""), (int, float, type(None)))):
        raise DamagedStageRecordError(f"{path} is damaged (not a stage record)")
    return StageRecord(str(record.get("name", "")), record["command"], record["inputs"], record["seconds"])


def write_stage_record(path: Path, record: StageRecord) -> None:
    """Write (atomically) the record of a stage, and remove the records of every stage after it: they read its
    new outputs, so they run again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for later in path.parent.glob("*.json"):
        if later.name > path.name:
            later.unlink()
    with atomic_output(path) as temp_name:
        Path(temp_name).write_text(json.dumps(asdict(record)) + "\n", encoding="utf-8")
