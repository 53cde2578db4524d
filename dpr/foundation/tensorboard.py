"""TensorBoard scalars when the tensorboard package is installed; a single log line saying so when it is not."""
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
            logger.info("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
            return
        self._writer = SummaryWriter(log_dir)
        logger.info("TensorBoard scalars in %s", log_dir)

    def add(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
