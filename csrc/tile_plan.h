// The tiles a query block walks, shared by the forward and the backward attention kernels:
// first the window tiles over the contiguous keys [w0, i1) that some row's window covers, then
// the block's list of selected keys (written by the selection), kTile keys per tile.
#pragma once

#include <cuda_runtime.h>

namespace sparsek {

template <int kTile>
struct TilePlan {
  int w0, i1;      // window keys [w0, i1)
  int n_win;       // window tiles
  int count;       // keys in the list
  const int* list;
  int n_tiles;

  __device__ TilePlan(const int* block_keys, const int* block_count, int bh, int blk, int n_blocks, int cap, int i0,
                      int i1_, int window)
      : i1(i1_) {
    w0 = window > 0 ? max(0, i0 - window + 1) : i1;  // window 0: no window tiles
    n_win = (i1 - w0 + kTile - 1) / kTile;
    count = block_count[(size_t)bh * n_blocks + blk];
    list = block_keys + ((size_t)bh * n_blocks + blk) * cap;
    n_tiles = n_win + (count + kTile - 1) / kTile;
  }

  // Key index of row `row` of tile t, -1 for padding (a global load for list tiles: callers
  // fetch it a tile ahead).
  __device__ int key(int t, int row) const {
    if (t >= n_tiles) return -1;
    if (t < n_win) {
      const int j = w0 + t * kTile + row;
      return j < i1 ? j : -1;
    }
    const int idx = (t - n_win) * kTile + row;
    return idx < count ? __ldg(list + idx) : -1;
  }
};

}  // namespace sparsek
