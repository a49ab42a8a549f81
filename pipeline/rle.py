"""COCO compressed RLE in numpy alone: reading and writing masks without pycocotools.

- `rles_pixels`: the foreground pixels of many compressed RLE masks of one image, parsed
  together (the training reader's decoder, `pipeline.decode`).
- `encode_counts`: binary masks -> compressed RLE counts, the strings pycocotools' `encode`
  writes, for code that runs where pycocotools is not installed (benchmarks/gpu_check.py).

The format (pycocotools' `rleToString`): run lengths over the mask in column-major order,
background first (so a mask whose first pixel is set starts with a run of 0); from the
fourth run on, each is stored as its difference to the run two before; each value is
written as little-endian 5-bit groups, 0x20 marking that more follow, 0x10 the sign of the
last group, plus 48 to make it printable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["encode_counts", "rles_pixels"]

_MAX_GROUPS = 8  # 5-bit groups of one value: 40 bits, beyond any mask's pixel count


def rles_pixels(
    counts: Sequence[str | bytes], height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(instance, rows, cols) of the foreground pixels of many compressed RLE masks of one
    image, parsed together with a fixed number of numpy calls (no per-mask Python loop).

    Pixels come grouped by instance (in input order), column-major within an instance. The
    counts are trusted (written by `encode_rle`); use `rle_counts` to validate foreign ones.
    """
    empty = np.zeros(0, np.int64)
    if len(counts) == 0:
        return empty, empty, empty
    encoded = [c.encode("ascii") if isinstance(c, str) else c for c in counts]
    n = len(encoded)
    c = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int64) - 48
    last = np.flatnonzero((c & 0x20) == 0)  # last character of each run
    first = np.r_[0, last[:-1] + 1]
    shift = 5 * (np.arange(len(c)) - np.repeat(first, last - first + 1))
    x = np.add.reduceat((c & 0x1F) << shift, first)
    negative = (c[last] & 0x10) != 0
    x[negative] |= -1 << (shift[last[negative]] + 5)
    # Instance of each run and its index m within the instance.
    inst = np.searchsorted(np.cumsum([len(e) for e in encoded]), last, side="right")
    run0 = np.searchsorted(inst, np.arange(n))  # first run of each instance
    m = np.arange(len(x)) - run0[inst]
    # Delta coding: runs[m] = x[m] + runs[m - 2] for m > 2, i.e. a cumulative sum per
    # instance over odd m, and over even m >= 2.
    odd = (m & 1) == 1
    x_odd, x_even = np.where(odd, x, 0), np.where(~odd & (m > 0), x, 0)
    c_odd, c_even = np.cumsum(x_odd), np.cumsum(x_even)
    base_odd, base_even = (c_odd - x_odd)[run0], (c_even - x_even)[run0]
    runs = np.where(odd, c_odd - base_odd[inst], c_even - base_even[inst])
    runs[m == 0] = x[m == 0]
    # Start of each run within its mask (column-major), then expand the foreground runs.
    c_runs = np.cumsum(runs)
    start = c_runs - runs - (c_runs - runs)[run0][inst]
    fg = odd & (runs > 0)
    fg_start, fg_len = start[fg], runs[fg]
    total = int(fg_len.sum())
    pos = np.repeat(fg_start - (np.cumsum(fg_len) - fg_len), fg_len) + np.arange(total)
    return np.repeat(inst[fg], fg_len), pos % height, pos // height


def encode_counts(masks: np.ndarray) -> list[str]:
    """Compressed RLE counts (str) of binary masks [K, H, W], as pycocotools' `encode` gives
    them, for all K masks with a fixed number of numpy calls."""
    k, height, width = masks.shape
    n = height * width
    flat = masks.astype(bool, copy=False).transpose(0, 2, 1).reshape(k, n)  # column-major
    # Positions (1..n) where a run starts after a change of value, as if each mask were
    # preceded by one background pixel: the runs of mask i are the gaps between 1, its
    # change positions and n + 1 (the first is 0 when the mask starts with foreground).
    owner, change = np.nonzero(np.diff(flat, axis=1, prepend=False))
    change = change + 1
    same_mask = np.r_[False, owner[1:] == owner[:-1]]
    previous = np.where(same_mask, np.r_[1, change[:-1]], 1)
    changes_per_mask = np.bincount(owner, minlength=k)
    ends = np.cumsum(changes_per_mask)  # where each mask's changes end
    last = np.ones(k, np.int64)
    has_changes = changes_per_mask > 0
    last[has_changes] = change[ends[has_changes] - 1]
    runs = np.insert(change - previous, ends, n + 1 - last)  # mask by mask
    run_owner = np.insert(owner, ends, np.arange(k))
    runs_per_mask = changes_per_mask + 1
    mask_start = np.repeat(np.cumsum(runs_per_mask) - runs_per_mask, runs_per_mask)
    delta = np.flatnonzero(np.arange(len(runs)) - mask_start > 2)  # a mask's 4th run on
    values = runs.astype(np.int64)
    values[delta] -= runs[delta - 2]
    # Little-endian 5-bit groups; a value ends at the first group after which the rest is
    # its sign extension (0, or -1 when the group's sign bit 0x10 is set).
    groups = np.empty((len(values), _MAX_GROUPS), np.int64)
    more = np.empty((len(values), _MAX_GROUPS), bool)
    rest = values
    for j in range(_MAX_GROUPS):
        groups[:, j] = rest & 0x1F
        rest = rest >> 5
        more[:, j] = np.where(groups[:, j] & 0x10, rest != -1, rest != 0)
    length = np.argmin(more, axis=1) + 1  # groups written per value
    written = np.arange(_MAX_GROUPS) < length[:, None]
    chars = (groups | np.where(more, 0x20, 0)) + 48
    text = chars[written].astype(np.uint8).tobytes().decode("ascii")
    per_mask = np.bincount(run_owner, weights=length, minlength=k).astype(np.int64)
    bounds = np.r_[0, np.cumsum(per_mask)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(k)]
