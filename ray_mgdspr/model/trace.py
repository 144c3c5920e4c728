"""The query tower as one compiled graph, for serving: ONNX Runtime (default) or TorchScript.

A served request is a batch of one: the tower's ~150 small ops then cost more in dispatch than in arithmetic.
Two graphs of the same module, each made at load and checked against it:

- ``onnx_tower``: exported to ONNX (torch's TorchScript-based exporter) and run by ONNX Runtime, whose per-op cost
  is lower than torch's. On the large preset (d 128), p50 per request: 5.5 ms against 6.8 traced (10.8 eager) in
  one-request batches on a slow day of this 2-core box, 3.4 against 5.1 in batches of 4
  (``benchmarks/query_tower.py``; ``docs/serving.md``, "The query tower").
- ``trace_tower``: traced, frozen and optimised for inference by TorchScript: 2.7 ms against 4.1 eager on a
  normal day. TorchScript is deprecated in torch 2.13 in favour of ``torch.compile``, which does not yet win here
  (69 s to compile, then 3.3 ms).

The tower has no data-dependent Python control flow (every branch reads the config), so one graph serves every
batch size and every history length; each maker still checks its graph against the eager module on the batches it
is given and refuses one that disagrees.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

Batch = dict[str, torch.Tensor]
Tower = Callable[[Batch], torch.Tensor]
ONNX_OPSET = 17


class TraceMismatch(RuntimeError):
    """The compiled graph's output differs from the eager module's."""


class _Positional(nn.Module):
    """A module of a batch dict as one of positional tensors (what ``torch.jit.trace`` and the exporter take)."""

    def __init__(self, tower: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.tower, self.keys = tower, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.tower(dict(zip(self.keys, tensors, strict=True)))


def _eval_mode(tower: nn.Module) -> None:
    if tower.training:
        raise ValueError("the query tower is compiled in eval mode (dropout off): call .eval() first")


def _checked(run: Tower, tower: nn.Module, batches: Sequence[Batch], atol: float, graph: str) -> Tower:
    """``run`` if it gives the module's output (within ``atol``) on every batch, else ``TraceMismatch``."""
    with torch.no_grad():
        for i, batch in enumerate(batches):
            diff = float((run(batch) - tower(batch)).abs().max())
            if not diff <= atol:
                raise TraceMismatch(f"the {graph} query tower differs from the module by {diff:.2e} (> {atol}) on "
                                    f"check batch {i}; serve another (serve.query_tower: torchscript or module)")
    return run


def trace_tower(tower: nn.Module, example: Batch, checks: Sequence[Batch] = (), atol: float = 1e-4) -> Tower:
    """``tower`` (in eval mode) as a TorchScript graph, called like the module on a batch dict with the keys
    of ``example``, under ``torch.inference_mode`` or ``torch.no_grad``.

    Raises:
        TraceMismatch: on ``example`` or one of ``checks``, the graph's output differs from the module's by more
            than ``atol``.
    """
    _eval_mode(tower)
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

    return _checked(run, tower, [example, *checks], atol, "traced")


@contextlib.contextmanager
def _no_fastpath() -> Iterator[None]:
    """Torch's fused attention kernels off (the exporter has no ONNX form for them), restored after."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


# torch's C++ notes while exporting the packed LSTM, printed to the process's stderr (no Python warning to filter)
_EXPORT_NOTES = re.compile(r"shape inference of prim::(PackPadded|PadPacked) type is missing")


@contextlib.contextmanager
def _native_stderr_without(notes: re.Pattern[str]) -> Iterator[None]:
    """The process's stderr (fd 2) into a temporary file meanwhile; written back after, less the lines that match
    ``notes`` (what anything else wrote meanwhile, another thread's included, still reaches stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True)
                    if not notes.search(line.decode(errors="replace"))]
            if kept:
                os.write(2, b"".join(kept))


def onnx_tower(tower: nn.Module, example: Batch, checks: Sequence[Batch] = (), atol: float = 1e-4,
               threads: int = 1) -> Tower:
    """``tower`` (in eval mode) exported to ONNX and run by ONNX Runtime on the CPU with ``threads`` intra-op
    threads, called like the module on a batch dict with the keys of ``example`` (any batch size; every other
    dimension as in ``example``: the featurizer's fixed widths); returns a tensor.

    The graph is exported to a temporary directory (weights past protobuf's 2 GB go to external files there) and
    loaded from it; only the inputs the graph reads are passed to it.

    Raises:
        TraceMismatch: on ``example`` or one of ``checks``, the graph's output differs from the module's by more
            than ``atol``.
    """
    import onnxruntime as ort

    _eval_mode(tower)
    keys = sorted(example)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting threads when idle
    options.log_severity_level = 3  # errors only: its notes on unused initializers and fusions are not ours
    with tempfile.TemporaryDirectory(prefix="query-tower-") as tmp, torch.no_grad(), _no_fastpath(), \
            warnings.catch_warnings(), _native_stderr_without(_EXPORT_NOTES):
        # the exporter's deprecation of itself (the torch.export-based one fails on this tower) and its notes on
        # traced Python values: the check against the module below is what guards the graph
        warnings.simplefilter("ignore")
        path = Path(tmp) / "query_tower.onnx"
        torch.onnx.export(_Positional(tower, keys).eval(), tuple(example[k] for k in keys), path, dynamo=False,
                          input_names=keys, output_names=["h_qu"], dynamic_axes={k: {0: "batch"} for k in keys},
                          opset_version=ONNX_OPSET)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]  # the exporter drops inputs the graph never reads

    def run(batch: Batch) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {k: np.ascontiguousarray(batch[k].numpy()) for k in inputs})[0])

    return _checked(run, tower, [example, *checks], atol, "ONNX")
