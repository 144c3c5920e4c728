"""``model.trace``: the query tower as an ONNX Runtime or TorchScript graph gives the module's H_qu for every batch
size, history length and ablation, and a graph that disagrees is refused."""

from __future__ import annotations

import pytest
import torch
from tiny_towers import batch, model_of, without_history

from ray_mgdspr.model.layers import safe_padding_mask
from ray_mgdspr.model.trace import TraceMismatch, onnx_tower, trace_tower

MAKERS = {"onnx": onnx_tower, "torchscript": trace_tower}


@pytest.mark.parametrize("graph", MAKERS)
@pytest.mark.parametrize("ablation", [{}, {"mgs": False}, {"trm": False}, {"personalise": False},
                                      {"price_level": False}])
def test_the_compiled_tower_equals_the_module_on_any_batch(graph: str, ablation: dict) -> None:
    tower = model_of(**ablation).query_tower
    example = without_history(batch(seed=1, n=1))  # made on one request without history, as served
    run = MAKERS[graph](tower, example)
    with torch.inference_mode():
        for b in [batch(seed=2, n=1), batch(seed=3, n=7, fill=1.0), batch(seed=4, n=3, fill=0.2),
                  without_history(batch(seed=5, n=2)), batch(seed=6, n=32)]:
            out = run(b)
            assert out.shape == (len(b["query_words"]), 16) and out.dtype == torch.float32
            assert torch.allclose(out, tower(b), atol=1e-5), (graph, ablation)


def test_the_onnx_export_leaves_torch_as_it_was() -> None:
    """The exporter needs torch's fused attention off; it is back on after, and the module's output unchanged."""
    tower = model_of().query_tower
    b = batch(seed=2, n=3)
    with torch.inference_mode():
        before = tower(b)
    assert torch.backends.mha.get_fastpath_enabled()
    onnx_tower(tower, batch(seed=1, n=1))
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.inference_mode():
        assert torch.equal(tower(b), before)


@pytest.mark.parametrize("graph", MAKERS)
def test_a_graph_that_disagrees_with_the_module_is_refused(graph: str) -> None:
    model = model_of()
    example = batch(seed=1, n=2)
    other = model_of().query_tower
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    with pytest.raises(TraceMismatch, match=r"serve\.query_tower: torchscript or module"):
        # a check whose reference is another module's output: the graph (of `other`) differs from `model`'s
        MAKERS[graph](_Swapped(other, model.query_tower).eval(), example)
    with pytest.raises(ValueError, match="eval mode"):
        MAKERS[graph](model.query_tower.train(), example)


def test_safe_padding_mask_unmasks_only_the_first_position_of_an_empty_row() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    assert safe_padding_mask(mask).tolist() == [[False, True, False], [False, True, True], [True, False, True]]
    assert mask.tolist() == [[True, False, True], [False, False, False], [False, True, False]]  # not changed


class _Swapped(torch.nn.Module):
    """Made from ``traced`` (traced or exported); called eagerly (the reference the makers check against) as
    ``eager``."""

    def __init__(self, traced: torch.nn.Module, eager: torch.nn.Module) -> None:
        super().__init__()
        self.traced, self.eager = traced, eager

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        return (self.traced if exporting else self.eager)(b)


def test_the_exporter_s_native_notes_are_dropped_and_other_output_kept(capfd: pytest.CaptureFixture[str]) -> None:
    """Torch prints its notes on the packed LSTM's shape inference to fd 2 from C++; they are dropped, what else
    reaches fd 2 meanwhile is written back."""
    import os

    from ray_mgdspr.model.trace import _EXPORT_NOTES, _native_stderr_without

    with _native_stderr_without(_EXPORT_NOTES):
        os.write(2, b"[W] Warning: The shape inference of prim::PackPadded type is missing, so ...\n")
        os.write(2, b"another thread's error\n")
    assert capfd.readouterr().err == "another thread's error\n"
    onnx_tower(model_of().query_tower, batch(seed=1, n=1))
    assert "prim::Pack" not in capfd.readouterr().err
