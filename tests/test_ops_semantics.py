"""Window semantics against hand-worked examples, brute-force properties and the inverse formulas (docs/ops.md)."""

from __future__ import annotations

import itertools

import pytest
import torch

from natzoo import ops
from natzoo.ops.neighborhood.indexing import axis_tiles, group_length, inverse_window, window
from oracle import axis_allowed, dense_mask_and_bias_index


def keys_of(x, length, k, s=1, d=1, causal=False):
    return [y for y in range(length) if axis_allowed(x, y, length, k, s, d, causal)]


def axis_table(length, k, s=1, d=1, causal=False):
    """Per-query key list, allowed flags and rpb indices from the reference's tile tables with 1-query tiles."""
    _, keys, allowed, bias, owner = axis_tiles(length, k, s, d, causal, 1)
    return [keys[owner[x]] for x in range(length)], [allowed[owner[x]][0] for x in range(length)], \
        [bias[owner[x]][0] for x in range(length)]


def table_keys(length, k, s=1, d=1, causal=False):
    keys, used, _ = axis_table(length, k, s, d, causal)
    return [[y for y, u in zip(row, urow) if u] for row, urow in zip(keys, used)]


# Hand-worked one-axis examples (a)-(e): the keys of every query, written out by hand from the window rules.
WORKED_EXAMPLES = {
    "a-noncausal": ((10, 3, 1, 1, False), [[0, 1, 2], [0, 1, 2], [1, 2, 3]] + [[x - 1, x, x + 1] for x in range(3, 9)]
                    + [[7, 8, 9]]),
    "a-causal": ((10, 3, 1, 1, True), [[0], [0, 1], [0, 1, 2]] + [[x - 2, x - 1, x] for x in range(3, 9)]
                 + [[7, 8, 9]]),
    "b-even": ((10, 4, 1, 1, False), [list(range(a, a + 4)) for a in (0, 0, 0, 1, 2, 3, 4, 5, 6, 6)]),
    "c-blocked": ((10, 4, 4, 1, False), [list(range(a, a + 4)) for a in (0, 0, 0, 0, 4, 4, 4, 4, 6, 6)]),
    "c-blocked-causal": ((10, 4, 4, 1, True), [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [4], [4, 5], [4, 5, 6],
                                               [4, 5, 6, 7], [6, 7, 8], [6, 7, 8, 9]]),
    "d-strided": ((10, 4, 2, 1, False), [list(range(a, a + 4)) for a in (0, 0, 1, 1, 3, 3, 5, 5, 6, 6)]),
    "d-strided-causal": ((10, 4, 2, 1, True), [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [2, 3, 4], [2, 3, 4, 5],
                                               [4, 5, 6], [4, 5, 6, 7], [6, 7, 8], [6, 7, 8, 9]]),
    "e-dilated": ((10, 3, 1, 3, False), [[0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 3, 6], [1, 4, 7], [2, 5, 8],
                                         [3, 6, 9], [1, 4, 7], [2, 5, 8], [3, 6, 9]]),
}


@pytest.mark.parametrize("name", list(WORKED_EXAMPLES))
def test_worked_examples(name):
    (length, k, s, d, causal), expected = WORKED_EXAMPLES[name]
    assert [keys_of(x, length, k, s, d, causal) for x in range(length)] == expected
    assert table_keys(length, k, s, d, causal) == expected


def test_worked_rpb_indices():
    # (a) rpb indices non-causal and causal; (b) even kernel; (e) dilated.
    _, _, bias = axis_table(10, 3, 1, 1, False)
    assert bias[0] == [2, 3, 4] and bias[1] == [1, 2, 3] and bias[5] == [1, 2, 3] and bias[9] == [0, 1, 2]
    _, used, bias = axis_table(10, 3, 1, 1, True)
    assert [b for b, u in zip(bias[1], used[1]) if u] == [1, 2] and bias[5] == [0, 1, 2]
    _, _, bias = axis_table(10, 4, 1, 1, False)
    assert [row[0] for row in bias] == [3, 2, 1, 1, 1, 1, 1, 1, 1, 0]
    _, _, bias = axis_table(10, 3, 1, 3, False)
    assert [row[0] for row in bias] == [2, 2, 2, 1, 1, 1, 1, 0, 0, 0]


def test_worked_two_axis_example():
    # (f) a two-axis example: map 6x8, k=(3,3), d=(1,2), query (0,5).
    mask, index = dense_mask_and_bias_index((6, 8), (3, 3), 1, (1, 2), False)
    q = 0 * 8 + 5
    attended = sorted(divmod(int(y), 8) for y in torch.nonzero(mask[q]).flatten())
    assert attended == [(r, c) for r in (0, 1, 2) for c in (3, 5, 7)]
    assert sorted({int(index[q, y, 0]) for y in range(48) if mask[q, y]}) == [2, 3, 4]
    assert sorted({int(index[q, y, 1]) for y in range(48) if mask[q, y]}) == [1, 2, 3]
    mask_c, _ = dense_mask_and_bias_index((6, 8), (3, 3), 1, (1, 2), (True, False))
    assert sorted(divmod(int(y), 8) for y in torch.nonzero(mask_c[q]).flatten()) == [(0, 3), (0, 5), (0, 7)]


INVERSE_TABLE = {  # hand-worked, L_g = 10: (k, s, causal) -> [qs, qe) per key j
    (3, 1, False): [(0, 2), (0, 3), (0, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 10), (7, 10), (8, 10)],
    (3, 1, True): [(0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 9), (7, 10), (8, 10), (9, 10)],
    (4, 2, False): [(0, 2), (0, 4), (0, 4), (0, 6), (2, 6), (4, 8), (4, 10), (6, 10), (6, 10), (8, 10)],
    (4, 2, True): [(0, 4), (1, 4), (2, 6), (3, 6), (4, 8), (5, 8), (6, 10), (7, 10), (8, 10), (9, 10)],
}


@pytest.mark.parametrize("args", list(INVERSE_TABLE), ids=str)
def test_worked_inverse_table(args):
    k, s, causal = args
    assert [inverse_window(j, 10, k, s, causal) for j in range(10)] == INVERSE_TABLE[args]


def test_inverse_formulas_exhaustive():
    """For all L_g <= 40, 2 <= k <= L_g, 1 <= s <= k, both causal modes, the closed-form inverse ranges
    equal the brute-force inverse of the forward window rule."""
    for group_len in range(2, 41):
        for k in range(2, group_len + 1):
            for s in range(1, k + 1):
                for causal in (False, True):
                    wins = [window(i, group_len, k, s, causal) for i in range(group_len)]
                    for j in range(group_len):
                        queries = [i for i, (a, b) in enumerate(wins) if a <= j < b]
                        assert queries == list(range(queries[0], queries[-1] + 1))
                        assert inverse_window(j, group_len, k, s, causal) == (queries[0], queries[-1] + 1), (
                            group_len, k, s, causal, j)


def test_window_properties_brute_force():
    """Documented properties: self in window, monotone starts/ends, rpb index in [0, 2k-2], k keys when non-causal."""
    for length in range(2, 26):
        for k in range(2, length + 1):
            for d in range(1, length // k + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        for g in range(d):
                            glen = group_length(length, d, g)
                            assert glen >= k
                            prev = (-1, -1)
                            for i in range(glen):
                                start, end = window(i, glen, k, s, causal)
                                assert start <= i < end and (start, end) >= prev
                                assert start >= prev[0] and end >= prev[1]
                                prev = (start, end)
                                assert 0 <= (k - 1) + (start - i) and (k - 1) + (end - 1 - i) <= 2 * k - 2
                                if not causal:
                                    assert end - start == k and end <= glen
                                else:
                                    assert 1 <= end - start <= k


@pytest.mark.parametrize(
    "spatial,kernel,stride,dilation,causal",
    [((9,), 3, 1, 2, False), ((10,), 4, 4, 1, True), ((5, 7), (2, 3), (2, 1), 1, (True, False)),
     ((4, 3, 5), (2, 3, 2), 1, (2, 1, 2), (False, True, False))],
)
def test_mask_recovery(spatial, kernel, stride, dilation, causal):
    """With Q = K = 0 and V = identity, each output row is the uniform distribution over the attended set."""
    n_tokens = 1
    for length in spatial:
        n_tokens *= length
    fn = {1: ops.na1d, 2: ops.na2d, 3: ops.na3d}[len(spatial)]
    zeros = torch.zeros(1, *spatial, 1, n_tokens, dtype=torch.float64)
    eye = torch.eye(n_tokens, dtype=torch.float64).reshape(1, *spatial, 1, n_tokens)
    out = fn(zeros, zeros, eye, kernel, stride=stride, dilation=dilation, is_causal=causal)
    mask, _ = dense_mask_and_bias_index(spatial, kernel, stride, dilation, causal)
    expected = mask.double() / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(out.reshape(n_tokens, n_tokens), expected, atol=1e-12, rtol=0)


def test_all_pairs_dilated_full_group():
    """k*d == L: every query attends to its whole dilation group (DiNAT at 224 px)."""
    for length, k, d in itertools.product((6, 8), (2, 3), (1, 2)):
        if k * d != length:
            continue
        mask, _ = dense_mask_and_bias_index((length,), k, 1, d, False)
        for x in range(length):
            assert [y for y in range(length) if mask[x, y]] == [y for y in range(length) if y % d == x % d]
