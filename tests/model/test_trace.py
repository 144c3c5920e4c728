"""``model.trace.trace_tower``: the query tower as a TorchScript graph gives the module's H_qu for every batch
size, history length and ablation, and a graph that disagrees is refused."""

from __future__ import annotations

import pytest
import torch
from tiny_towers import batch, model_of, without_history

from ray_mgdspr.model.trace import TraceMismatch, trace_tower


@pytest.mark.parametrize("ablation", [{}, {"mgs": False}, {"trm": False}, {"personalise": False},
                                      {"price_level": False}])
def test_the_traced_tower_equals_the_module_on_any_batch(ablation: dict) -> None:
    tower = model_of(**ablation).query_tower
    example = without_history(batch(seed=1, n=1))  # traced on one request without history, as served
    run = trace_tower(tower, example)
    with torch.inference_mode():
        for b in [batch(seed=2, n=1), batch(seed=3, n=7, fill=1.0), batch(seed=4, n=3, fill=0.2),
                  without_history(batch(seed=5, n=2)), batch(seed=6, n=32)]:
            assert torch.allclose(run(b), tower(b), atol=1e-5), ablation


def test_a_graph_that_disagrees_with_the_module_is_refused() -> None:
    model = model_of()
    example = batch(seed=1, n=2)
    other = model_of().query_tower
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    with pytest.raises(TraceMismatch, match=r"serve\.trace_query_tower: false"):
        # a check whose reference is another module's output: the graph (of `other`) differs from `model`'s
        trace_tower(_Swapped(other, model.query_tower).eval(), example)
    with pytest.raises(ValueError, match="eval mode"):
        trace_tower(model.query_tower.train(), example)


class _Swapped(torch.nn.Module):
    """Traced as ``traced``; called eagerly (the reference ``trace_tower`` checks against) as ``eager``."""

    def __init__(self, traced: torch.nn.Module, eager: torch.nn.Module) -> None:
        super().__init__()
        self.traced, self.eager = traced, eager

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.traced if torch.jit.is_tracing() else self.eager)(b)
