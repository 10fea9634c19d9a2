"""Row-wise Adagrad against a hand computation, on sparse and dense gradients."""

from __future__ import annotations

import torch

from exfm.train.optim import RowWiseAdagrad


def _hand_step(weight, accumulator, grad_rows: dict[int, torch.Tensor], lr, eps):
    weight, accumulator = weight.clone(), accumulator.clone()
    for row, g in grad_rows.items():
        accumulator[row] += g.square().mean()
        weight[row] -= lr * g / (accumulator[row].sqrt() + eps)
    return weight, accumulator


def test_sparse_steps_match_the_formula_and_touch_only_used_rows():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(10, 4))
    optimizer = RowWiseAdagrad([table], lr=0.1, eps=1e-8)
    expected_w, expected_s = table.detach().clone(), torch.zeros(10)
    for ids in ([1, 3, 3, 7], [3, 5]):  # repeated ids: the row's gradients are summed first
        index = torch.tensor(ids)
        upstream = torch.randn(len(ids), 4)
        loss = (torch.nn.functional.embedding(index, table, sparse=True) * upstream).sum()
        optimizer.zero_grad()
        loss.backward()
        assert table.grad.is_sparse
        rows = {r: upstream[index == r].sum(0) for r in set(ids)}
        expected_w, expected_s = _hand_step(expected_w, expected_s, rows, 0.1, 1e-8)
        optimizer.step()
        torch.testing.assert_close(table.detach(), expected_w)
        torch.testing.assert_close(optimizer.state[table]["sum"], expected_s)
    untouched = [0, 2, 4, 6, 8, 9]
    assert torch.all(optimizer.state[table]["sum"][untouched] == 0)


def test_dense_gradients_give_the_same_update_as_sparse_ones():
    torch.manual_seed(1)
    init = torch.randn(6, 3)
    index = torch.tensor([0, 2, 2, 5])
    upstream = torch.randn(4, 3)
    results = []
    for sparse in (True, False):
        table = torch.nn.Parameter(init.clone())
        optimizer = RowWiseAdagrad([table], lr=0.05)
        (torch.nn.functional.embedding(index, table, sparse=sparse) * upstream).sum().backward()
        optimizer.step()
        results.append(table.detach())
    # Rows without a gradient get a zero update on the dense path too.
    torch.testing.assert_close(results[0], results[1])
