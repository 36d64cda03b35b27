/* The kernels of knn_scan.c for one type of value, included once per type: T is the type,
   INDEX an integer of its width, SQRT its square root, FN(name) the name for this type. */

/* The chunk's state, shared by every strip: `rows` rows (a multiple of LANES), `queries` of them
   real; per row the ranking (`depth` values and items), how much of it is filled and the nearest
   item; per strip, class and row the sums of distances and of cosines (strips x classes x 2 x
   LANES: one strip's sums are contiguous and stay in the cache). */
typedef struct {
  int64_t rows, queries, depth, n_classes;
  T* top_values; int64_t* top_items; int64_t* filled;
  T* nearest_values; int64_t* nearest_items; T* sums;
  /* what `finish` reads (the queries' classes, the gallery's classes, each class's count) and
     writes (per query: 6 hits, its average precision, its prediction) */
  const int64_t* query_classes; const int64_t* gallery_classes; const int64_t* counts;
  uint8_t* hits; double* precision; int64_t* prediction;
} FN(state);

/* the items of one block: count, index of the first, whether it is the gallery's last, and per
   item what the kernel reads */
typedef struct {
  int64_t items, offset, last;
  const T* squared_norms; const T* inverse_norms; const int64_t* classes;
} FN(items);

static void FN(bounds)(const T* maxima, int64_t groups, int64_t depth, T* low) {
  /* per lane, a value that `depth` of its group maxima reach, by bisection (all lanes in step):
     as at least `depth` items reach it, every item below it is outside the `depth` most similar */
  T high[LANES], middle[LANES], count[LANES];
  int done[LANES];
  for (int k = 0; k < LANES; ++k) { low[k] = high[k] = maxima[k]; done[k] = 0; }
  for (int64_t g = 1; g < groups; ++g)
    for (int k = 0; k < LANES; ++k) {
      const T m = maxima[g * LANES + k];
      low[k] = m < low[k] ? m : low[k]; high[k] = m > high[k] ? m : high[k];
    }
  for (int step = 0; step < 32; ++step) {
    for (int k = 0; k < LANES; ++k) { middle[k] = low[k] + (high[k] - low[k]) / 2; count[k] = 0; }
    for (int64_t g = 0; g < groups; ++g)
      for (int k = 0; k < LANES; ++k) count[k] += maxima[g * LANES + k] >= middle[k] ? 1 : 0;
    int active = 0;
    for (int k = 0; k < LANES; ++k) {
      if (done[k]) continue;
      if (!(middle[k] > low[k])) { done[k] = 1; continue; }
      /* any value that `depth` maxima reach will do: stop once few more than `depth` reach it */
      if (count[k] >= depth) { low[k] = middle[k]; done[k] = count[k] <= depth + depth / 16 + 1; }
      else high[k] = middle[k];
      active += !done[k];
    }
    if (!active) break;
  }
}

/* a stable sort, most similar first, of `n` values and their items (`spare`: room for n each) */
static void FN(sort)(T* values, int64_t* items, int64_t n, T* spare, int64_t* spare_items) {
  T* from = values; int64_t* from_items = items; T* to = spare; int64_t* to_items = spare_items;
  for (int64_t width = 1; width < n; width *= 2) {
    for (int64_t low = 0; low < n; low += 2 * width) {
      const int64_t middle = low + width < n ? low + width : n;
      const int64_t high = low + 2 * width < n ? low + 2 * width : n;
      int64_t a = low, b = middle, o = low;
      while (a < middle && b < high) {
        /* the right run's value goes first only if larger: equal values keep their order */
        if (from[b] > from[a]) { to[o] = from[b]; to_items[o++] = from_items[b++]; }
        else { to[o] = from[a]; to_items[o++] = from_items[a++]; }
      }
      for (; a < middle; ++a) { to[o] = from[a]; to_items[o++] = from_items[a]; }
      for (; b < high; ++b) { to[o] = from[b]; to_items[o++] = from_items[b]; }
    }
    T* t = from; from = to; to = t;
    int64_t* u = from_items; from_items = to_items; to_items = u;
  }
  if (from != values)
    for (int64_t i = 0; i < n; ++i) { values[i] = from[i]; items[i] = from_items[i]; }
}

/* the ranking of one row (`filled` values and items, most similar first) and `count` new
   candidates (items in gallery order, later than every kept one) made one: the first `depth`
   of their stable descending sort. `merged`, `spare`: room for depth + CAPACITY(depth) each */
static void FN(merge)(T* values, int64_t* kept, int64_t* filled, int64_t depth,
                      T* candidates, int64_t* items, int64_t count, T* merged,
                      int64_t* merged_items, T* spare, int64_t* spare_items) {
  const int64_t n = *filled, total = n + count;
  if (count <= FEW) {
    /* a few candidates: each inserted after the values at least as large, which are earlier */
    int64_t m = n;
    for (int64_t i = 0; i < count; ++i) {
      const T v = candidates[i];
      if (m == depth && !(v > values[depth - 1])) continue;
      int64_t k = m < depth ? m++ : depth - 1;
      for (; k > 0 && values[k - 1] < v; --k) { values[k] = values[k - 1]; kept[k] = kept[k - 1]; }
      values[k] = v; kept[k] = items[i];
    }
    *filled = m;
    return;
  }
  if (total <= COUNTED) {
    /* each value's place: the values above it, and the equal values before it (lower items) */
    for (int64_t i = 0; i < n; ++i) { merged[i] = values[i]; merged_items[i] = kept[i]; }
    for (int64_t i = 0; i < count; ++i) { merged[n + i] = candidates[i]; merged_items[n + i] = items[i]; }
    for (int64_t i = 0; i < total; ++i) {
      const T v = merged[i];
      int64_t place = 0;
      for (int64_t j = 0; j < total; ++j) place += (merged[j] > v) | ((merged[j] == v) & (j < i));
      if (place < depth) { values[place] = v; kept[place] = merged_items[i]; }
    }
    *filled = total < depth ? total : depth;
    return;
  }
  FN(sort)(candidates, items, count, spare, spare_items);
  int64_t a = 0, b = 0, o = 0;
  for (; o < depth && (a < n || b < count); ++o) {
    /* a candidate goes first only if larger: on equal values the kept (lower) item does */
    if (b == count || (a < n && !(candidates[b] > values[a]))) { merged[o] = values[a]; merged_items[o] = kept[a++]; }
    else { merged[o] = candidates[b]; merged_items[o] = items[b++]; }
  }
  for (int64_t i = 0; i < o; ++i) { values[i] = merged[i]; kept[i] = merged_items[i]; }
  *filled = o;
}

/* row r's bound raised to the last value of its ranking once that is full (shut: an equal
   later item cannot enter) */
static void FN(shut)(const FN(state)* state, int64_t r, T* bound, int* open) {
  const int64_t depth = state->depth;
  if (state->filled[r] < depth) return;
  const T last = state->top_values[r * depth + depth - 1];
  if (last >= *bound) { *bound = last; *open = 0; }
}

static void FN(flush)(const FN(state)* state, int64_t r, T* candidates, int64_t* items,
                      int64_t count, T* merged, int64_t* merged_items, T* spare,
                      int64_t* spare_items) {
  const int64_t depth = state->depth;
  if (count == 0) return;  /* nothing new: the ranking stands */
  FN(merge)(state->top_values + r * depth, state->top_items + r * depth, state->filled + r,
            depth, candidates, items, count, merged, merged_items, spare, spare_items);
}

/* what a strip carries from tile to tile of a block, in its part of the scratch: its nearest
   item so far (distance, index in the block) and the largest cosine of every QUARTER items */
typedef struct { T* best; INDEX* at; T* quarter_maxima; } FN(carried);

static FN(carried) FN(carried_at)(char* part) {
  FN(carried) carried = {(T*)part, (INDEX*)(part + ALIGNED(LANES * sizeof(T))),
                         (T*)(part + 2 * ALIGNED(LANES * sizeof(T)))};
  return carried;
}

/* the strip of LANES rows from `first` before a block: at the gallery's first block (offset 0)
   afresh, its sums zeroed here, where they are used next */
static void FN(begin)(int64_t first, const FN(items)* block, const FN(state)* state, FN(carried) carried) {
  if (block->offset == 0) {
    memset(state->sums + (first / LANES) * state->n_classes * 2 * LANES, 0,
           (size_t)(state->n_classes * 2 * LANES) * sizeof(T));
    for (int64_t r = first; r < first + LANES; ++r) {
      state->filled[r] = 0; state->nearest_values[r] = INFINITY; state->nearest_items[r] = 0;
    }
  }
  for (int k = 0; k < LANES; ++k) { carried.best[k] = INFINITY; carried.at[k] = 0; }
}

/* quarters `q_start` to `q_stop` - 1 of the block's items for the strip of LANES rows from
   `first` (its products: `products`, items x `stride`): distances, both class sums and the
   minimum distance; the cosines' maxima by quarters of groups (the items after the last whole
   group form one more quarter, whose maximum is not kept) */
static void FN(pass)(const T* restrict products, int64_t stride, int64_t first, const T* query_sq,
                     int64_t q_start, int64_t q_stop, const FN(items)* block, const FN(state)* state,
                     FN(carried) carried) {
  const int64_t items = block->items, quarters = items / GROUP * (GROUP / QUARTER);
  const T* item_sq = block->squared_norms; const T* item_inv = block->inverse_norms;
  const int64_t* classes = block->classes;
  /* the strip's sums: per class, LANES distance sums then LANES cosine sums, all contiguous */
  T* restrict strip_sums = state->sums + (first / LANES) * state->n_classes * 2 * LANES;
  T sq[LANES], best[LANES], largest[LANES];
  INDEX at[LANES];
  for (int k = 0; k < LANES; ++k) { sq[k] = query_sq[k]; best[k] = carried.best[k]; at[k] = carried.at[k]; }
  for (int64_t q = q_start; q < q_stop; ++q) {
    const int64_t stop = q < quarters ? (q + 1) * QUARTER : items;
    for (int k = 0; k < LANES; ++k) largest[k] = -INFINITY;
    for (int64_t j = q * QUARTER; j < stop; ++j) {
      const T* restrict p = products + j * stride;
      __builtin_prefetch(p + 16 * stride); /* the line 16 items on: its neighbours' are far apart */
      T* restrict s = strip_sums + classes[j] * 2 * LANES;
      T* restrict c = s + LANES;
      const T inv = item_inv[j], isq = item_sq[j];
      const INDEX index = (INDEX)j;
      for (int k = 0; k < LANES; ++k) {
        const T cosine = p[k] * inv;
        largest[k] = cosine > largest[k] ? cosine : largest[k];
        c[k] += cosine;
        const T t = (isq - (T)2 * p[k]) + sq[k];
        const T d = SQRT(t > (T)0 ? t : (T)0);
        s[k] += d;
        const int closer = d < best[k];
        at[k] = closer ? index : at[k];
        best[k] = closer ? d : best[k];
      }
    }
    if (q < quarters)
      for (int k = 0; k < LANES; ++k) carried.quarter_maxima[q * LANES + k] = largest[k];
  }
  for (int k = 0; k < LANES; ++k) { carried.best[k] = best[k]; carried.at[k] = at[k]; }
}

/* the strip of LANES rows from `first` after its pass over the whole block: its nearest item,
   and its ranking merged with the block's items that can enter it, with `scratch` */
static void FN(rank)(const T* restrict products, int64_t stride, int64_t first,
                     const FN(items)* block, const FN(state)* state, FN(carried) carried,
                     char* scratch) {
  const int64_t items = block->items, groups = items / GROUP, depth = state->depth;
  const T* item_inv = block->inverse_norms;
  const T* quarter_maxima = carried.quarter_maxima;
  T* restrict maxima = (T*)scratch;
  const int64_t capacity = CAPACITY(depth), room = depth + capacity;
  const int64_t quarters = groups * (GROUP / QUARTER);
  int64_t* chosen = (int64_t*)(scratch + ALIGNED((groups + 1) * LANES * sizeof(T)));
  T* candidates = (T*)((char*)chosen + ALIGNED((items / GROUP + 1) * 8));
  int64_t* candidate_items = (int64_t*)((char*)candidates + ALIGNED(LANES * capacity * sizeof(T)));
  T* merged = (T*)((char*)candidate_items + ALIGNED(LANES * capacity * 8));
  int64_t* merged_items = (int64_t*)((char*)merged + ALIGNED(room * sizeof(T)));
  T* spare = (T*)((char*)merged_items + ALIGNED(room * 8));
  int64_t* spare_items = (int64_t*)((char*)spare + ALIGNED(room * sizeof(T)));
  int32_t* lists = (int32_t*)((char*)spare_items + ALIGNED(room * 8));
  for (int64_t g = 0; g < groups; ++g)
    for (int k = 0; k < LANES; ++k) {
      T m = quarter_maxima[g * (GROUP / QUARTER) * LANES + k];
      for (int i = 1; i < GROUP / QUARTER; ++i) {
        const T v = quarter_maxima[(g * (GROUP / QUARTER) + i) * LANES + k];
        m = v > m ? v : m;
      }
      maxima[g * LANES + k] = m;
    }
  /* per row, a bound below which no item of this block can rank: from the group maxima, or,
     once the ranking is full, its last value, which an equal later item cannot pass ("shut");
     padding rows rank nothing */
  T bounds[LANES];
  /* where every row's ranking is full (after a first block), its last value is the bound */
  int full = 1;
  for (int k = 0; k < LANES && first + k < state->queries; ++k) full &= state->filled[first + k] == depth;
  if (groups >= depth && !full) FN(bounds)(maxima, groups, depth, bounds);
  int open[LANES];
  for (int k = 0; k < LANES; ++k) {
    const int64_t r = first + k;
    open[k] = 1;
    if (groups < depth || full) bounds[k] = -INFINITY;
    if (r >= state->queries) { bounds[k] = INFINITY; open[k] = 0; continue; }
    if (carried.best[k] < state->nearest_values[r]) {
      state->nearest_values[r] = carried.best[k];
      state->nearest_items[r] = block->offset + carried.at[k];
    }
    FN(shut)(state, r, bounds + k, open + k);
  }
  /* per row, the quarters whose maximum reaches its bound (in groups whose maximum does) and the
     last items' quarter, in gallery order; then their products fetched for all rows at once:
     they are in memory, not the cache, and one row's reads alone waited for each other */
  const int64_t real = first + LANES <= state->queries ? LANES : state->queries - first;
  int64_t listed[LANES];
  for (int k = 0; k < real; ++k) {
    const T bound = bounds[k];
    int32_t* list = lists + k * (quarters + 1);
    int64_t m = 0, n = 0;
    for (int64_t g = 0; g < groups; ++g) { chosen[m] = g; m += maxima[g * LANES + k] >= bound; }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t q = chosen[i] * (GROUP / QUARTER); q < (chosen[i] + 1) * (GROUP / QUARTER); ++q) {
        list[n] = (int32_t)q; n += quarter_maxima[q * LANES + k] >= bound;
      }
    list[n++] = (int32_t)quarters;
    listed[k] = n;
  }
  for (int k = 0; k < real; ++k)
    for (int64_t i = 0; i + 1 < listed[k]; ++i) {
      const T* p = products + lists[k * (quarters + 1) + i] * QUARTER * stride;
      for (int j = 0; j < QUARTER; ++j) __builtin_prefetch(p + j * stride);
    }
  /* candidates: items of those quarters above their row's bound (or at it, while open), in
     gallery order; a full buffer is merged into the row's ranking, which may raise its bound.
     Counted without a branch: each item is written, and kept only if it passes */
  for (int k = 0; k < real; ++k) {
    const int64_t r = first + k;
    T* gathered = candidates + k * capacity;
    int64_t* gathered_items = candidate_items + k * capacity;
    const int32_t* list = lists + k * (quarters + 1);
    T bound = bounds[k];
    int is_open = open[k];
    int64_t n = 0;
    for (int64_t i = 0; i < listed[k]; ++i) {
      const int64_t q = list[i], stop = q < quarters ? (q + 1) * QUARTER : items;
      if (q < quarters && quarter_maxima[q * LANES + k] < bound) continue;  /* raised since */
      for (int64_t j = q * QUARTER; j < stop; ++j) {
        const T cosine = products[j * stride + k] * item_inv[j];
        gathered[n] = cosine; gathered_items[n] = block->offset + j;
        n += (cosine > bound) | ((cosine == bound) & is_open);
        if (n == capacity) {
          FN(flush)(state, r, gathered, gathered_items, n, merged, merged_items, spare, spare_items);
          n = 0;
          FN(shut)(state, r, &bound, &is_open);
        }
      }
    }
    FN(flush)(state, r, gathered, gathered_items, n, merged, merged_items, spare, spare_items);
  }
}

/* per query of a strip once every block is scanned, in `hits` (queries x 6): whether its class
   is that of one of its 1, 3 and 5 most similar items, of best mean cosine, of its nearest item
   and of least mean distance (mean ties to the lower class); its average precision at R, R being
   its class's count (NaN where 0), and the class of its most similar item */
static void FN(finish)(const FN(state)* state, int64_t strip) {
  const int64_t depth = state->depth, n_classes = state->n_classes;
  const int64_t* query_classes = state->query_classes; const int64_t* gallery_classes = state->gallery_classes;
  const int64_t* counts = state->counts;
  /* the means of a strip's LANES rows at once: per class, sums divided by its count */
  T cosine[LANES], distance[LANES];
  INDEX cosine_class[LANES], distance_class[LANES];
  for (int k = 0; k < LANES; ++k) { cosine_class[k] = distance_class[k] = -1; cosine[k] = distance[k] = 0; }
  const T* sums = state->sums + strip * n_classes * 2 * LANES;
  for (int64_t c = 0; c < n_classes; ++c) {
    if (counts[c] == 0) continue;
    const T count = (T)counts[c];
    const T* s = sums + c * 2 * LANES;
    for (int k = 0; k < LANES; ++k) {
      const T mean_distance = s[k] / count, mean_cosine = s[LANES + k] / count;
      const int nearer = distance_class[k] < 0 || mean_distance < distance[k];
      const int closer = cosine_class[k] < 0 || mean_cosine > cosine[k];
      distance[k] = nearer ? mean_distance : distance[k];
      distance_class[k] = nearer ? (INDEX)c : distance_class[k];
      cosine[k] = closer ? mean_cosine : cosine[k];
      cosine_class[k] = closer ? (INDEX)c : cosine_class[k];
    }
  }
  for (int k = 0; k < LANES && strip * LANES + k < state->queries; ++k) {
    const int64_t r = strip * LANES + k;
    const int64_t own = query_classes[r], relevant = counts[own], n = state->filled[r];
    const int64_t* kept = state->top_items + r * depth;
    uint8_t* hit = state->hits + 6 * r;
    int64_t found = 0;
    double total = 0;
    hit[0] = hit[1] = hit[2] = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (gallery_classes[kept[i]] != own) continue;
      hit[0] |= i < 1; hit[1] |= i < 3; hit[2] |= i < 5;
      if (i < relevant) total += (double)++found / (double)(i + 1);
    }
    hit[3] = cosine_class[k] == own;
    hit[4] = gallery_classes[state->nearest_items[r]] == own;
    hit[5] = distance_class[k] == own;
    state->precision[r] = relevant > 0 ? total / (double)relevant : NAN;
    state->prediction[r] = gallery_classes[kept[0]];
  }
}

/* strips `strip_start` to `strip_stop` - 1 of a block's products (items x `stride`, the rows of
   the state from `first` on), one after the other, with `scratch` */
void FN(knn_block)(const T* products, int64_t stride, int64_t first, int64_t strip_start,
                   int64_t strip_stop, const T* query_sq, const FN(items)* block,
                   const FN(state)* state, char* scratch) {
  const int64_t quarters = block->items / GROUP * (GROUP / QUARTER);
  const FN(carried) carried = FN(carried_at)(scratch + rank_bytes(block->items, state->depth, sizeof(T)));
  for (int64_t strip = strip_start; strip < strip_stop; ++strip) {
    const T* strip_products = products + strip * LANES;
    const int64_t row = first + strip * LANES;
    FN(begin)(row, block, state, carried);
    FN(pass)(strip_products, stride, row, query_sq + row, 0, quarters + 1, block, state, carried);
    FN(rank)(strip_products, stride, row, block, state, carried, scratch);
    /* after the last block, while the strip's sums are still in the cache */
    if (block->last) FN(finish)(state, row / LANES);
  }
}

/* the squared L2 norm of each of `rows` rows of `dim` values, summed in LANES partial sums (in
   the same order on every machine, so exact wherever the values' squares sum exactly) */
void FN(squared_norms)(const T* vectors, int64_t rows, int64_t dim, T* out, int64_t threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const T* v = vectors + r * dim;
    T partial[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= dim; i += LANES)
      for (int k = 0; k < LANES; ++k) partial[k] += v[i + k] * v[i + k];
    for (int k = 0; i < dim; ++i, ++k) partial[k] += v[i] * v[i];
    T total = 0;
    for (int k = 0; k < LANES; ++k) total += partial[k];
    out[r] = total;
  }
}

/* the strips of `count` pieces of a block's products (piece i: `products[i]`, items x
   `strides[i]`, the rows of the state from `firsts[i]` on), shared among `threads` threads of the
   OpenMP runtime (torch's own where it is OpenMP's, whose threads then need no wake-up), each
   with `scratch_stride` bytes of scratch. Pieces have an odd number of strips: one at a time, a
   thread waited at the end of each for the other's last strip */
void FN(knn_pieces)(const T* const* products, const int64_t* strides, const int64_t* firsts,
                    int64_t count, const T* query_sq, const FN(items)* block, const FN(state)* state,
                    char* scratch, int64_t scratch_stride, int64_t threads) {
  int64_t strips = 0;
  for (int64_t i = 0; i < count; ++i) strips += strides[i] / LANES;
  #pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t strip = 0; strip < strips; ++strip) {
    int64_t piece = 0, local = strip;
    while (local >= strides[piece] / LANES) local -= strides[piece++] / LANES;
    FN(knn_block)(products[piece], strides[piece], firsts[piece], local, local + 1, query_sq, block,
                  state, scratch + THREAD * scratch_stride);
  }
}

/* a BLAS ?gemm (Fortran interface): C = alpha op(A) op(B) + beta C, column-major */
typedef void (*FN(gemm))(const char* op_a, const char* op_b, const int* m, const int* n, const int* k,
                         const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
                         const T* beta, T* c, const int* ldc);

/* A block's products made here and scanned, in two phases. The chunk's padded queries
   (`queries`, rows x `dim`) go in `count` pieces (piece i: `rows[i]` rows from `firsts[i]`),
   no more than threads. 1: each piece, taken by one thread, passes over the whole block
   (`vectors`, items x `dim`) a tile of `tile` items (a multiple of GROUP) at a time: `gemm`
   writes the tile's products with the piece (items x rows, a stride of an odd number of strips,
   see knn_scan.pieces) into part `slot` + i of `products` (`products_stride` values each), and
   every strip of the piece passes over them while they are in the cache, its carried state in
   `carried` (`carried_stride` bytes per strip of the chunk). 2: every strip ranks the block's
   items, reading back only the products that can enter its ranking; strips go to whichever
   thread is free, each with part `slot` + its number of `scratch`. `phases`: 1 the products, 2
   the passes, 4 the rankings (1 alone times the products). */
void FN(knn_fused)(FN(gemm) gemm, const T* queries, int64_t dim, const T* vectors, int64_t tile,
                   const int64_t* firsts, const int64_t* rows, int64_t count, const T* query_sq,
                   const FN(items)* block, const FN(state)* state, T* products,
                   int64_t products_stride, char* carried, int64_t carried_stride, char* scratch,
                   int64_t scratch_stride, int64_t slot, int64_t threads, int64_t phases) {
  const int64_t quarters = block->items / GROUP * (GROUP / QUARTER);
  int64_t strips = 0;
  for (int64_t i = 0; i < count; ++i) strips += rows[i] / LANES;
  #pragma omp parallel num_threads(threads)
  {
    if (phases & 3) {
      #pragma omp for schedule(dynamic)
      for (int64_t piece = 0; piece < count; ++piece) {
        const int64_t first = firsts[piece], own_strips = rows[piece] / LANES;
        const int64_t stride = rows[piece] + (own_strips % 2 ? 0 : LANES);
        T* own = products + (slot + piece) * products_stride;
        const int m = (int)rows[piece], k = (int)dim, ld = (int)stride;
        const T one = 1, zero = 0;
        for (int64_t s = 0; s < own_strips; ++s)
          FN(begin)(first + s * LANES, block, state, FN(carried_at)(carried + (first / LANES + s) * carried_stride));
        for (int64_t start = 0; start < block->items; start += tile) {
          const int n = (int)(block->items - start < tile ? block->items - start : tile);
          /* column-major: the piece's products with the tile (rows x n) = queries^T x vectors */
          gemm("T", "N", &m, &n, &k, &one, queries + first * dim, &k, vectors + start * dim, &k, &zero,
               own + start * stride, &ld);
          if (!(phases & 2)) continue;
          const int64_t q_stop = start + n == block->items ? quarters + 1 : (start + n) / QUARTER;
          for (int64_t s = 0; s < own_strips; ++s)
            FN(pass)(own + s * LANES, stride, first + s * LANES, query_sq + first + s * LANES,
                     start / QUARTER, q_stop, block, state,
                     FN(carried_at)(carried + (first / LANES + s) * carried_stride));
        }
      }
    }
    if (phases & 4) {
      #pragma omp for schedule(dynamic)
      for (int64_t strip = 0; strip < strips; ++strip) {
        int64_t piece = 0, local = strip;
        while (local >= rows[piece] / LANES) local -= rows[piece++] / LANES;
        const int64_t first = firsts[piece] + local * LANES, own_strips = rows[piece] / LANES;
        const int64_t stride = rows[piece] + (own_strips % 2 ? 0 : LANES);
        FN(rank)(products + (slot + piece) * products_stride + local * LANES, stride, first, block, state,
                 FN(carried_at)(carried + (first / LANES) * carried_stride),
                 scratch + (slot + THREAD) * scratch_stride);
        if (block->last) FN(finish)(state, first / LANES);
      }
    }
  }
}
