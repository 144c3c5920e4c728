"""The query tower as one TorchScript graph, for serving.

A served request is a batch of one: the tower's ~150 small ops then cost more in Python dispatch than in
arithmetic. Traced, frozen and optimised for inference, the tower of the large preset (d 128) ran a one-request
batch in 2.7 ms against 4.1 ms eager on this 2-core box; ``torch.compile`` (inductor, dynamic shapes) took 69 s
to compile and then ran 3.3 ms (``docs/serving.md``, "The query tower"). TorchScript is deprecated in torch 2.13
in favour of ``torch.compile``, which does not yet win here; ``serve.trace_query_tower: false`` runs the eager
module.

The tower has no data-dependent Python control flow (every branch reads the config), so one trace serves every
batch size and every history length; ``trace_tower`` still checks the graph against the eager module on the
batches it is given and refuses a graph that disagrees.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

Batch = dict[str, torch.Tensor]


class TraceMismatch(RuntimeError):
    """The traced graph's output differs from the eager module's."""


class _Positional(nn.Module):
    """A module of a batch dict as one of positional tensors (what ``torch.jit.trace`` takes)."""

    def __init__(self, tower: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.tower, self.keys = tower, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.tower(dict(zip(self.keys, tensors, strict=True)))


def trace_tower(tower: nn.Module, example: Batch, checks: Sequence[Batch] = (), atol: float = 1e-4
                ) -> Callable[[Batch], torch.Tensor]:
    """``tower`` (in eval mode) as a TorchScript graph, called like the module on a batch dict with the keys
    of ``example``, under ``torch.inference_mode`` or ``torch.no_grad``.

    Raises:
        TraceMismatch: on ``example`` or one of ``checks``, the graph's output differs from the module's by more
            than ``atol``.
    """
    if tower.training:
        raise ValueError("trace_tower needs a module in eval mode (dropout off)")
    keys = sorted(example)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13: freeze / optimize_for_inference
        # pad_packed_sequence checks `total_length < max_seq_length` in Python: the LSTM pads to the sequence's
        # full width, so the check is false for every batch and the trace may keep it as a constant
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.utils.rnn")
        graph = torch.jit.trace(_Positional(tower, keys).eval(), tuple(example[k] for k in keys), check_trace=False)
        graph = torch.jit.optimize_for_inference(torch.jit.freeze(graph))

    def run(batch: Batch) -> torch.Tensor:
        return graph(*(batch[k] for k in keys))

    with torch.no_grad():
        for i, batch in enumerate([example, *checks]):
            diff = float((run(batch) - tower(batch)).abs().max())
            if not diff <= atol:
                raise TraceMismatch(f"the traced query tower differs from the module by {diff:.2e} (> {atol}) on "
                                    f"check batch {i}; serve it eager (serve.trace_query_tower: false)")
    return run
