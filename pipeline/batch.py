"""The batch every reader yields and every model consumes.

sparse (KeyedJaggedTensor, keys = features.sparse names in config order):

    feature  | sample 0 | sample 1 | ...
    u0       | [17]     | [3]      |
    s_item   | [4, 9]   | []       |

dense   B x F   float32 (features.dense; missing values: NaN, filled by the model's dense input)
labels  B x K   float32 in {0, 1} (features.labels, one column per task)
weights B       float32: 1 for real rows, 0 for padding rows (data.drop_last = false)
user_ids B      int64 (features.user_id; zeros when not configured)
row_ids  B      int64 (data.row_id_column; -1 when not configured)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """One batch of rows; see the module docstring for shapes."""

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    user_ids: torch.Tensor
    row_ids: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy every tensor (and the KJT) to `device`."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> Batch:
        """Page-locked copies for asynchronous host-to-device transfer (CUDA only)."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def record_stream(self, stream: torch.Stream) -> None:
        """For TorchRec's train pipelines (Pipelineable protocol)."""
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)
