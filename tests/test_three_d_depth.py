"""Depth axis: residual blocks are found in fx graphs (traced and ONNX-converted), ranked, and removed exactly."""

from __future__ import annotations

import torch
from test_three_d_models import X, converted, one_thread, traced

__all__ = ["one_thread"]  # the autouse fixture, re-exported so it applies here

from pruning_core.methods.three_d.depth import (
    branch_ratios,
    count_params,
    find_residual_blocks,
    rank_blocks,
    remove_blocks,
)


def test_finds_exactly_the_identity_skip_blocks_of_a_traced_model() -> None:
    gm = traced()
    blocks = find_residual_blocks(gm, X)
    # 4 Blocks; the strided Down (projection skip) must not be found.
    assert [b.branch for b in blocks] == ["s1_0_c2", "s1_1_c2", "s2_0_c2", "s2_1_c2"]
    assert [b.shape for b in blocks] == [(1, 16, 16, 16)] * 2 + [(1, 32, 8, 8)] * 2


def test_removal_takes_exactly_the_chosen_blocks_and_keeps_the_model_runnable() -> None:
    gm = traced()
    blocks = find_residual_blocks(gm, X)
    chosen = [blocks[1].name, blocks[2].name]
    out = remove_blocks(gm, chosen)
    left = [b.name for b in find_residual_blocks(out, X)]
    assert left == [blocks[0].name, blocks[3].name]
    # Exactly the chosen branches' parameters are gone (two 3x3 convs with bias each).
    branch = sum(p.numel() for n, p in gm.named_parameters() if n.startswith(("s1.1.", "s2.0.")))
    assert count_params(gm) - count_params(out) == branch > 0
    assert not any(n.startswith(("s1.1.", "s2.0.")) for n, _ in out.named_parameters())
    assert out(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    assert out(torch.randn(3, 1, 12, 12)).shape == (3, 10)  # still resolution-agnostic
    # The original is untouched (removal works on a copy).
    assert [b.name for b in find_residual_blocks(gm, X)] == [b.name for b in blocks]


def test_removing_a_block_whose_branch_is_zero_changes_nothing_and_ranks_it_first() -> None:
    gm = traced()
    with torch.no_grad():
        gm.s2.get_submodule("0").c2.weight.zero_()
        gm.s2.get_submodule("0").c2.bias.zero_()
    blocks = find_residual_blocks(gm, X)
    ratios = branch_ratios(gm, blocks, torch.randn(8, 1, 16, 16))
    target = next(b for b in blocks if b.branch == "s2_0_c2")
    assert ratios[target.name] == 0.0 and all(v > 0 for k, v in ratios.items() if k != target.name)
    assert rank_blocks(gm, blocks, torch.randn(8, 1, 16, 16))[0].name == target.name
    x = torch.randn(4, 1, 16, 16)
    # relu(x + 0) = x because x is itself a ReLU output: removal is exact (float tolerance for op order only).
    torch.testing.assert_close(remove_blocks(gm, [target.name])(x), gm(x), rtol=0, atol=1e-6)


def test_onnx_converted_model_blocks_are_found_and_removed() -> None:
    gm = converted()
    blocks = find_residual_blocks(gm, X)
    assert len(blocks) == 4, [b.name for b in blocks]
    out = remove_blocks(gm, [blocks[0].name, blocks[3].name])
    assert len(find_residual_blocks(out, X)) == 2
    assert count_params(out) < count_params(gm)
    assert out(torch.randn(2, 1, 16, 16)).shape == (2, 10)
