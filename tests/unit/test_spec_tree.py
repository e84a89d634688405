"""Tree verification's parts: the static tree (shape, ancestors, acceptance walk), its config,
the tree attention mask of the paged backends against brute-force attention along each path,
and the K/V move onto the accepted path's slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetlm.attention.base import BatchLayout
from fleetlm.attention.registry import get_attention_backend
from fleetlm.spec_decode.config import SpeculativeConfig
from fleetlm.spec_decode.tree import DraftTree, copy_kv_slots, default_tree, parse_tree, walk

TREE = DraftTree(default_tree(3))  # (0) (1) (2) (0,0) (0,1) (1,0) (0,0,0) (0,0,1)


def test_default_tree_shape_and_parents():
    assert TREE.paths == ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1))
    assert TREE.parents == (-1, -1, -1, 0, 0, 1, 3, 3)
    assert [TREE.num_nodes(d) for d in range(4)] == [0, 3, 6, 8]
    assert TREE.depth_of(5) == 2 and TREE.ranks_at(1) == 3 and TREE.ranks_at(3) == 2
    m = TREE.ancestor_matrix(8)  # row/col 0 is the root
    assert m[7].nonzero()[0].tolist() == [0, 1, 4, 7]  # (0,0,0): root, (0), (0,0), itself
    assert m[6].nonzero()[0].tolist() == [0, 2, 6]  # (1,0): root, (1), itself
    assert m[:, 0].all() and np.diag(m).all() and not np.triu(m, 1).any()


def test_walk_follows_the_samples_and_stops_at_the_first_miss():
    nodes = [10, 11, 12, 20, 21, 30, 40, 41]
    # root samples 11 -> node (1); there 30 -> node (1,0), a leaf: its sample is the bonus
    samples = [11, 0, 30, 0, 0, 0, 77, 0, 0]
    assert walk(TREE, nodes, samples) == ([11, 30, 77], [1, 5])
    samples = [10, 21, 0, 0, 0, 5, 0, 0, 0]  # (0) then (0,1), whose sample 5 ends it
    assert walk(TREE, nodes, samples) == ([10, 21, 5], [0, 4])
    assert walk(TREE, nodes, [99] * 9) == ([99], [])
    assert walk(TREE, nodes[:3], [12, 20, 21, 7]) == ([12, 7], [2])  # a cut tree: (2) is a leaf


@pytest.mark.parametrize("raw, match", [
    ({"verification": "beam"}, "verification"),
    ({"verification": "tree", "tree": [[0], [0, 0], [1, 1]]}, "lacks its parent"),
    ({"verification": "tree", "tree": [[0], [0, 0]]}, "depth"),
    ({"verification": "tree", "tree": [[0], [0], [0, 0], [0, 0, 0]]}, "twice"),
    ({"verification": "tree", "tree": [[0], [-1]]}, "ranks"),
    ({"tree": [[0]]}, "only used with verification 'tree'"),
])
def test_bad_tree_config_is_a_value_error(raw, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.from_dict({"method": "medusa", "model": "x", "num_speculative_tokens": 3, **raw})


def test_tree_config_is_refused_for_chain_only_methods_and_parsed_for_heads():
    with pytest.raises(ValueError, match="verification"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "verification": "tree"})
    c = SpeculativeConfig.from_dict({"method": "eagle", "model": "x", "num_speculative_tokens": 2,
                                     "verification": "tree", "tree": [[1], [0], [0, 0], [0, 1]]})
    assert c.tree == ((0,), (1,), (0, 0), (0, 1)) and c.max_draft_tokens == 4
    assert SpeculativeConfig.from_dict(c.to_dict()) == c  # survives the trip to the engine core
    d = SpeculativeConfig.from_dict({"method": "medusa", "model": "x", "num_speculative_tokens": 4, "verification": "tree"})
    assert d.tree == default_tree(4) and len(d.tree) == 10
    assert parse_tree(None, 3) == default_tree(3)


def _brute(q, kc, vc, k_new, v_new, allowed):
    """Row r attends to the context and the new rows ``allowed[r]`` only, one SDPA per row."""
    outs = []
    for r in range(q.shape[0]):
        keys = torch.cat([kc, k_new[allowed[r]]])  # [L, Hkv, D]
        vals = torch.cat([vc, v_new[allowed[r]]])
        o = F.scaled_dot_product_attention(q[r].unsqueeze(1)[None], keys.transpose(0, 1)[None],
                                           vals.transpose(0, 1)[None], enable_gqa=True)
        outs.append(o[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["torch_paged", "cpu_native"])
def test_tree_mask_equals_attention_along_each_path(backend):
    from fleetlm.ops import cpu_ops

    if backend == "cpu_native" and cpu_ops() is None:
        pytest.skip("cpu_native kernel not built here")
    torch.manual_seed(0)
    bs, h, hkv, d, nb = 4, 4, 2, 8, 16
    be = get_attention_backend(backend, torch.device("cpu"), bs, torch.float32)
    cache = torch.randn(2, nb, bs, hkv, d)
    n = 8  # root + 8 nodes of the default tree after 5 cached tokens; plus a plain decode request
    tree_rows, c = n + 1, 5
    tree_blocks, dec_blocks = [3, 7, 1, 9], [5, 2]
    dec_ctx = 6
    table = np.array([dec_blocks + [0, 0], tree_blocks])
    pos = np.arange(c, c + tree_rows)
    slots = [dec_blocks[dec_ctx // bs] * bs + dec_ctx % bs] + [tree_blocks[p // bs] * bs + p % bs for p in pos]
    mask = TREE.ancestor_matrix(n)
    layout = BatchLayout(np.array([1, tree_rows]), np.array([dec_ctx, c]), table, torch.tensor(slots), 1,
                         tree_masks=(None, mask))
    q, k, v = torch.randn(1 + tree_rows, h, d), torch.randn(1 + tree_rows, hkv, d), torch.randn(1 + tree_rows, hkv, d)

    def ctx_kv(blocks, length):
        flat = cache[:, blocks].reshape(2, -1, hkv, d)
        return flat[0, :length].clone(), flat[1, :length].clone()

    kc, vc = ctx_kv(tree_blocks, c)
    dkc, dvc = ctx_kv(dec_blocks, dec_ctx)
    out = be.forward(q, k, v, cache, be.build_metadata(layout, torch.device("cpu")))
    want = _brute(q[1:], kc, vc, k[1:], v[1:], mask)
    torch.testing.assert_close(out[1:], want, rtol=1e-5, atol=1e-5)
    want_dec = _brute(q[:1], dkc, dvc, k[:1], v[:1], np.ones((1, 1), dtype=bool))
    torch.testing.assert_close(out[:1], want_dec, rtol=1e-5, atol=1e-5)
    # the chain path is untouched: without tree masks the same query is causal
    causal = BatchLayout(np.array([1, tree_rows]), np.array([dec_ctx, c]), table, torch.tensor(slots), 1)
    out_c = be.forward(q, k, v, cache, be.build_metadata(causal, torch.device("cpu")))
    torch.testing.assert_close(out_c[1:], _brute(q[1:], kc, vc, k[1:], v[1:], np.tril(np.ones((9, 9), bool))),
                               rtol=1e-5, atol=1e-5)


def test_copy_kv_slots_moves_every_layer():
    cache = torch.randn(3, 2, 4, 4, 2, 8)  # [layers, 2, blocks, block_size, kv heads, head dim]
    before = cache.clone().view(3, 2, 16, 2, 8)
    copy_kv_slots(cache, [9, 13, 6], [5, 6, 7])  # overlapping: 6 is read before it is written
    flat = cache.view(3, 2, 16, 2, 8)
    for s, dd in ((9, 5), (13, 6), (6, 7)):
        assert torch.equal(flat[:, :, dd], before[:, :, s])
    assert torch.equal(flat[:, :, :5], before[:, :, :5])
