/* One block of gallery items against a chunk of queries, in one pass over their products, laid
   out item by item (items x queries): per query, the `depth` most similar items by cosine (most
   similar first, ties to the lower index), the nearest item by Euclidean distance (ties to the
   lower index), and the sums of its distances and of its cosines to the items of each class,
   each carried over from the blocks before. Queries go in strips of LANES, whose products with
   one item are contiguous: each step works on a strip at once, in the vector registers. */
#include <stdint.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD omp_get_thread_num()
#else
#define THREAD 0
#endif
#define LANES 16
#define GROUP 16
#define QUARTER 4  /* items per quarter of a group, whose maxima screen its items */
#define ALIGNED(bytes) (((bytes) + 63) / 64 * 64)
/* candidates a row gathers before they are merged into its ranking */
#define CAPACITY(depth) ((depth) + 64)
/* at most this many candidates are inserted one by one; at most COUNTED values (kept and
   candidates) are ranked by counting, more by sorting */
#define FEW 8
#define COUNTED 128

/* bytes of scratch a strip's ranking needs for a block of `items` items, `depth` deep */
static int64_t rank_bytes(int64_t items, int64_t depth, int64_t size) {
  const int64_t merged = depth + CAPACITY(depth);
  return ALIGNED((items / GROUP + 1) * LANES * size) + ALIGNED((items / GROUP + 1) * 8)
       + ALIGNED(LANES * CAPACITY(depth) * size) + ALIGNED(LANES * CAPACITY(depth) * 8)
       + 2 * (ALIGNED(merged * size) + ALIGNED(merged * 8))
       + ALIGNED(LANES * (items / QUARTER + 1) * 4);  /* each row's list of quarters */
}

/* bytes a strip carries over a block of `items` items (see FN(carried)) */
int64_t strip_bytes(int64_t items, int64_t size) {
  return 2 * ALIGNED(LANES * size) + ALIGNED((items / QUARTER + 1) * LANES * size);
}

/* bytes of scratch one thread needs: a strip's ranking and what it carries */
int64_t scratch_bytes(int64_t items, int64_t depth, int64_t size) {
  return rank_bytes(items, depth, size) + strip_bytes(items, size);
}

#define JOIN2(a, b) a##b
#define JOIN(a, b) JOIN2(a, b)
#define FN(name) JOIN(name, SUFFIX)

#define T float
#define INDEX int32_t
#define SQRT sqrtf
#define SUFFIX _f32
#include "knn_scan_kernel.h"
#undef T
#undef INDEX
#undef SQRT
#undef SUFFIX

#define T double
#define INDEX int64_t
#define SQRT sqrt
#define SUFFIX _f64
#include "knn_scan_kernel.h"
