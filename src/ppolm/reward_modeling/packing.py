"""Prefix-shared packing: each pair's common prefix computed once, no padding.

The chosen and rejected texts of a pair usually share their prompt, which is most of their
tokens (a review request of 19 tokens before a response of 8). A plain batch runs the prompt
twice and pads every text to the longest. Packed, a pair is one *tree* of tokens::

    [shared prefix p_0..p_{P-1} | chosen suffix c_0..c_{C-1} | rejected suffix r_0..r_{R-1}]

with position ids 0..P-1, P..P+C-1, P..P+R-1 (each suffix continues the prefix), and an
attention mask in which the prefix is causal, each suffix sees the whole prefix and itself
causally, and the two suffixes never see each other. Each token then sees exactly what it sees
in its own text, at the same position, so its hidden state is the same (to float rounding); the
scores are read at the last token of each suffix. Several trees share a row (the mask is block
diagonal over them) and the rows are filled evenly, so almost no token is padding.

A text that several pairs of the batch hold (the K responses of a prompt compared each with
each, InstructGPT's comparisons) is run once: the pairs linked by shared texts make one tree,
their common prefix and then each distinct text's suffix, and each pair reads its two scores
from it.

The shared prefix is the longest common run of token ids of the tree's texts, cut so that each
suffix keeps at least one token (the score is read at a suffix's last token). Shapes are
written as K pairs, N rows of T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Tokens a row is filled to before the next row opens (a longer tree gets a row of its own).
#: Attention in a row costs T^2 per head: at a few hundred tokens it stays far below the
#: matmuls, and rows are few enough that each matmul keeps its rows x hidden size shape large.
ROW_TOKENS = 256


@dataclass(frozen=True)
class PackedPairs:
    """K pairs packed into N rows of T tokens.

    ``input_ids``, ``position_ids`` (N, T) long; ``attention_mask`` (N, 1, T, T) additive
    float (0 where a query token may attend, the dtype's minimum where not); ``chosen_at`` and
    ``rejected_at`` (K, 2) long, the (row, column) of each pair's scored tokens; ``margin``
    (K,) or None; ``real`` the tokens that are not padding."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    chosen_at: Tensor
    rejected_at: Tensor
    margin: Tensor | None
    real: int

    @property
    def pairs(self) -> int:
        return int(self.chosen_at.shape[0])

    @property
    def read_at(self) -> Tensor:
        """The scored tokens, chosen rows first: (2K, 2)."""
        return torch.cat([self.chosen_at, self.rejected_at])


def shared_prefix(*texts: list[int]) -> int:
    """Length of the common start of ``texts``, leaving each at least one token."""
    n, limit = 0, min(len(t) for t in texts) - 1
    while n < limit and all(t[n] == texts[0][n] for t in texts[1:]):
        n += 1
    return n


def linked_groups(links: list[tuple[int, int]], count: int) -> list[list[int]]:
    """The groups of items 0..count-1 that ``links`` (pairs of items) connect, each in order of
    its first item, items in order."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def number_texts(chosen: list[list[int]], rejected: list[list[int]]
                 ) -> tuple[list[tuple[int, ...]], list[tuple[int, int]]]:
    """Each distinct text once, in order of first appearance (chosen sides, then rejected), and
    each pair's (chosen, rejected) numbers in that list."""
    texts: dict[tuple[int, ...], int] = {}
    for t in (*chosen, *rejected):
        texts.setdefault(tuple(t), len(texts))
    sides = [(texts[tuple(c)], texts[tuple(r)]) for c, r in zip(chosen, rejected, strict=True)]
    return list(texts), sides


def pair_groups(chosen: list[list[int]], rejected: list[list[int]]) -> list[list[int]]:
    """The pairs that share a text (the same chosen or rejected token ids), linked into groups:
    each group's pair indices in order, the groups in order of their first pair."""
    _, sides = number_texts(chosen, rejected)
    owner: dict[int, int] = {}                  # a text -> the first pair holding it
    links = [(owner.setdefault(text, k), k) for k, pair in enumerate(sides) for text in pair]
    return linked_groups(links, len(chosen))


def fill_rows(sizes: list[int], row_tokens: int = ROW_TOKENS) -> list[list[int]]:
    """Which trees go in which row: ceil(total / row_tokens) rows (at least one), the largest
    tree first into the least-filled row, so the rows end about equally long. Returns each
    row's tree indices in placement order."""
    rows = max(1, -(-sum(sizes) // row_tokens))
    rows = min(rows, len(sizes))
    fills: list[list[int]] = [[] for _ in range(rows)]
    load = [0] * rows
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        j = min(range(rows), key=lambda j: (load[j], j))
        fills[j].append(k)
        load[j] += sizes[k]
    return fills


def pack_pairs(chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
               margin: list[float] | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", row_tokens: int = ROW_TOKENS) -> PackedPairs:
    """Pack pairs (token id lists, each side at least one token) as the module says;
    ``dtype`` is the attention mask's (the model's)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"pack_pairs needs as many chosen as rejected texts (at least one), "
                         f"got {len(chosen)} and {len(rejected)}.")
    K = len(chosen)
    distinct, sides = number_texts(chosen, rejected)
    # chosen and rejected of a pair in a tree, so are the pairs sharing a text
    trees = linked_groups(sides, len(distinct))
    prefix = [shared_prefix(*(list(distinct[i]) for i in tree)) for tree in trees]
    sizes = [P + sum(len(distinct[i]) - P for i in tree) for tree, P in zip(trees, prefix,
                                                                             strict=True)]
    fills = fill_rows(sizes, row_tokens)
    T = max(sum(sizes[k] for k in row) for row in fills)
    N = len(fills)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    pos = torch.zeros((N, T), dtype=torch.long)
    allow = torch.eye(T, dtype=torch.bool).repeat(N, 1, 1)      # padding sees itself only
    read = torch.zeros((len(distinct), 2), dtype=torch.long)    # each text's scored token
    for j, row in enumerate(fills):
        o = 0
        for k in row:
            P, tree = prefix[k], trees[k]
            ids[j, o: o + P] = torch.tensor(distinct[tree[0]][:P], dtype=torch.long)
            pos[j, o: o + P] = torch.arange(P)
            allow[j, o: o + P, o: o + P] = _causal(P)
            a = o + P
            for i in tree:                      # each text's suffix after the shared prefix
                suffix = distinct[i][P:]
                b = a + len(suffix)
                ids[j, a: b] = torch.tensor(suffix, dtype=torch.long)
                pos[j, a: b] = torch.arange(P, P + len(suffix))
                allow[j, a: b, o: o + P] = True
                allow[j, a: b, a: b] = _causal(len(suffix))
                read[i] = torch.tensor([j, b - 1])
                a = b
            o = a
    mask = torch.zeros((N, 1, T, T), dtype=dtype).masked_fill(
        ~allow[:, None], torch.finfo(dtype).min)
    m = None if margin is None else torch.tensor(margin, dtype=torch.float32, device=device)
    index = torch.tensor(sides, dtype=torch.long).reshape(K, 2)
    return PackedPairs(ids.to(device), pos.to(device), mask.to(device),
                       read[index[:, 0]].to(device), read[index[:, 1]].to(device), m,
                       sum(sizes))


def _causal(n: int) -> Tensor:
    return torch.tril(torch.ones((n, n), dtype=torch.bool))
