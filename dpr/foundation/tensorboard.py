"""TensorBoard scalars when the `tensorboard` extra is installed. Without it a run loses nothing it needs (the
records file and the log hold the same values), so its absence is a debug line, not a warning on every run."""
import logging
from typing import Optional

logger = logging.getLogger(__name__)


class ScalarLog:
    def __init__(self, log_dir: Optional[str], enabled: bool = True):
        self._writer = None
        if not (enabled and log_dir):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.debug("no TensorBoard scalars: the tensorboard extra is not installed (pip install -e \".[tensorboard]\")")
            return
        self._writer = SummaryWriter(log_dir)
        logger.info("TensorBoard scalars in %s", log_dir)

    @property
    def writing(self) -> bool:
        return self._writer is not None

    def add(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
