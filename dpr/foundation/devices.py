"""Which device a process runs on."""
import os
from typing import Optional

import torch


def process_device(no_cuda: bool = False, local_rank: Optional[int] = -1) -> torch.device:
    """The GPU of this process (`cuda:LOCAL_RANK` when a launcher set one, else `cuda:local_rank`, else the current
    GPU), or the CPU when there is none or `no_cuda`."""
    if no_cuda or not torch.cuda.is_available():
        return torch.device("cpu")
    env_rank = os.environ.get("LOCAL_RANK")
    rank = int(env_rank) if env_rank is not None else (local_rank if local_rank is not None else -1)
    return torch.device("cuda", rank) if rank >= 0 else torch.device("cuda")
