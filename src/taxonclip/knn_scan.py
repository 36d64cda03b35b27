"""One pass of C over a block of query x gallery products, in place of knn's passes of torch.

For each query it keeps, across the blocks of the gallery: the `depth` most similar items by
cosine (most similar first, ties to the lower index), the nearest item by Euclidean distance
(ties to the lower index) and the sum of its distances to the items of each class, from the
same products, read once while they are in the processor's cache. knn's torch operations read
and write every product four to eight times, which took about as long as the products
themselves on 2-core CPUs.

The C source below is compiled at the first use in a process, with the system's C compiler,
into a temporary folder (removed at once; the loaded library stays mapped). Where no compiler
works, `native()` is None and knn keeps its torch operations, which give the same rankings and
nearest items; distances may differ in the last bit, as torch's vectorised square root is not
always correctly rounded.

Built with OpenMP where the compiler has it, the kernel shares the queries among the threads of the
OpenMP runtime already loaded (torch's), which computed the products just before: on 2 cores a
separate pool of threads competed with them and the kernel ran barely faster on two threads than
on one. Without OpenMP, parts of the rows run on a pool of Python threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# -O3 vectorises the passes; no -ffast-math: IEEE results, in the order written; contraction off
# so that no compiler fuses a multiply and an add into one rounding the torch path does not do
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")
ENABLE_VARIABLE = "TAXONCLIP_KNN_NATIVE"  # "0": always knn's torch operations
PARTS_PER_THREAD = 4

SOURCE = r"""
/* One block of gallery items against rows of queries, in one pass over their products: per row,
   the `depth` most similar items by cosine (most similar first, ties to the lower index), the
   nearest item by Euclidean distance (ties to the lower index) and the sum of the distances to
   the items of each class, each carried over from the blocks before. */
#include <stdint.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD omp_get_thread_num()
#else
#define THREAD 0
#endif
#define GROUP 16
#define ROWS_PER_TASK 16

#define KERNEL(NAME, T, BITS, SQRT)                                                                    \
static T NAME##_bound(const T* maxima, int64_t n, int64_t depth) {                            \
  /* a value that `depth` of the maxima reach, by bisection: as at least `depth` items reach    \
     it, every item below it is outside the `depth` most similar */                             \
  T low = maxima[0], high = maxima[0];                                                           \
  for (int64_t g = 1; g < n; ++g) {                                                              \
    low = maxima[g] < low ? maxima[g] : low;                                                     \
    high = maxima[g] > high ? maxima[g] : high;                                                  \
  }                                                                                              \
  for (int step = 0; step < 20; ++step) {                                                        \
    T middle = low + (high - low) / 2;                                                           \
    if (!(middle > low)) break;                                                                  \
    int64_t count = 0;                                                                           \
    for (int64_t g = 0; g < n; ++g) count += maxima[g] >= middle;                                \
    /* any value that `depth` maxima reach will do: stop once few more than `depth` reach it */  \
    if (count >= depth) { low = middle; if (count <= depth + depth / 4 + 1) break; }            \
    else high = middle;                                                                          \
  }                                                                                              \
  return low;                                                                                    \
}                                                                                                \
                                                                                                 \
static void NAME##_keep(T* values, int64_t* kept, int64_t* n, int64_t depth, T value, int64_t item) { \
  int64_t k = *n;                                                                                \
  if (k == depth) {                                                                              \
    if (value < values[k - 1] || (value == values[k - 1] && item > kept[k - 1])) return;         \
    --k;                                                                                         \
  } else {                                                                                       \
    ++*n;                                                                                        \
  }                                                                                              \
  while (k > 0 && (values[k - 1] < value || (values[k - 1] == value && kept[k - 1] > item))) {   \
    values[k] = values[k - 1]; kept[k] = kept[k - 1]; --k;                                       \
  }                                                                                              \
  values[k] = value; kept[k] = item;                                                             \
}                                                                                                \
                                                                                                 \
void NAME(const T* products, int64_t row_start, int64_t row_stop, int64_t items, int64_t offset, \
          const T* query_sq, const T* item_sq, const T* item_inv, const int64_t* classes,        \
          int64_t n_classes, int64_t depth, T* top_values,                \
          int64_t* top_items, int64_t* filled, T* nearest_values, int64_t* nearest_items,        \
          T* sums, T* scratch) {                                                                 \
  const int64_t groups = items / GROUP, whole = groups * GROUP;                                  \
  /* distances of two rows in turn: their class sums are added together, one load of each item's \
     class for both rows */                                                                      \
  T* cosines = scratch;                                                                          \
  T* maxima = scratch + 3 * items;                                                               \
  for (int64_t r = row_start; r < row_stop; ++r) {                                               \
    const T* p = products + r * items;                                                           \
    const T sq = query_sq[r];                                                                    \
    T* distances = scratch + items + ((r - row_start) & 1) * items;                              \
    for (int64_t j = 0; j < items; ++j) {                                                        \
      cosines[j] = p[j] * item_inv[j];                                                           \
      T t = (item_sq[j] - (T)2 * p[j]) + sq;                                                     \
      distances[j] = SQRT(t > (T)0 ? t : (T)0);                                                  \
    }                                                                                            \
    T* row_sums = sums + r * n_classes;                                                          \
    if ((r - row_start) & 1) {                                                                   \
      T* previous_sums = row_sums - n_classes; const T* previous = distances - items;            \
      for (int64_t j = 0; j < items; ++j) {                                                      \
        const int64_t c = classes[j];                                                            \
        previous_sums[c] += previous[j]; row_sums[c] += distances[j];                            \
      }                                                                                          \
    } else if (r + 1 == row_stop) {                                                              \
      for (int64_t j = 0; j < items; ++j) row_sums[classes[j]] += distances[j];                  \
    }                                                                                            \
    /* nearest: distances are >= 0, ordered as their bits are as unsigned integers, whose       \
       minimum vectorises; then the first item at that distance */                              \
    BITS fewest = ~(BITS)0;                                                                      \
    for (int64_t j = 0; j < items; ++j) {                                                        \
      BITS bits;                                                                                 \
      memcpy(&bits, distances + j, sizeof bits);                                                 \
      fewest = bits < fewest ? bits : fewest;                                                    \
    }                                                                                            \
    T smallest;                                                                                  \
    memcpy(&smallest, &fewest, sizeof smallest);                                                 \
    if (smallest < nearest_values[r]) {                                                          \
      int64_t j = 0;                                                                             \
      while (distances[j] != smallest) ++j;                                                      \
      nearest_values[r] = smallest; nearest_items[r] = offset + j;                               \
    }                                                                                            \
    /* most similar: group g holds the items g, g + groups, ...; a value that `depth` group     \
       maxima reach bounds the depth-th largest cosine from below, so only groups reaching it   \
       hold candidates */                                                                        \
    T* values = top_values + r * depth; int64_t* kept = top_items + r * depth;                   \
    int64_t n = filled[r];                                                                       \
    T bound = -INFINITY;                                                                         \
    if (groups >= depth) {                                                                       \
      for (int64_t g = 0; g < groups; ++g) maxima[g] = cosines[g];                               \
      for (int l = 1; l < GROUP; ++l)                                                            \
        for (int64_t g = 0; g < groups; ++g)                                                     \
          maxima[g] = cosines[l * groups + g] > maxima[g] ? cosines[l * groups + g] : maxima[g]; \
      bound = NAME##_bound(maxima, groups, depth);                                               \
      if (n == depth && values[depth - 1] > bound) bound = values[depth - 1];                    \
      for (int64_t g = 0; g < groups; ++g) {                                                     \
        if (maxima[g] < bound) continue;                                                         \
        for (int l = 0; l < GROUP; ++l) {                                                        \
          int64_t j = l * groups + g;                                                            \
          if (cosines[j] >= bound) NAME##_keep(values, kept, &n, depth, cosines[j], offset + j); \
        }                                                                                        \
      }                                                                                          \
      for (int64_t j = whole; j < items; ++j)                                                    \
        NAME##_keep(values, kept, &n, depth, cosines[j], offset + j);                            \
    } else {                                                                                     \
      for (int64_t j = 0; j < items; ++j) NAME##_keep(values, kept, &n, depth, cosines[j], offset + j); \
    }                                                                                            \
    filled[r] = n;                                                                               \
  }                                                                                              \
}                                                                                                \
                                                                                                 \
/* every row, in tasks of ROWS_PER_TASK rows shared among `threads` threads of the OpenMP runtime \
   (torch's own where it is OpenMP's, whose threads then need no wake-up), each with its own     \
   scratch of `stride` values */                                                                 \
void NAME##_rows(const T* products, int64_t rows, int64_t items, int64_t offset,                 \
                 const T* query_sq, const T* item_sq, const T* item_inv, const int64_t* classes, \
                 int64_t n_classes, int64_t depth, T* top_values, int64_t* top_items,            \
                 int64_t* filled, T* nearest_values, int64_t* nearest_items, T* sums, T* scratch, \
                 int64_t stride, int64_t threads) {                                              \
  const int64_t tasks = (rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;                              \
  _Pragma("omp parallel for schedule(dynamic) num_threads(threads)")                             \
  for (int64_t task = 0; task < tasks; ++task) {                                                 \
    const int64_t first = task * ROWS_PER_TASK;                                                  \
    const int64_t last = first + ROWS_PER_TASK < rows ? first + ROWS_PER_TASK : rows;            \
    NAME(products, first, last, items, offset, query_sq, item_sq, item_inv, classes, n_classes,  \
         depth, top_values, top_items, filled, nearest_values, nearest_items, sums,              \
         scratch + THREAD * stride);                                                             \
  }                                                                                              \
}

#define NORMS(NAME, T)                                                                                 \
/* the squared L2 norm of each of `rows` rows of `dim` values, summed in LANES partial sums (in  \
   the same order on every machine, so exact wherever the values' squares sum exactly) */        \
void NAME(const T* vectors, int64_t rows, int64_t dim, T* out, int64_t threads) {                \
  _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
  for (int64_t r = 0; r < rows; ++r) {                                                           \
    const T* v = vectors + r * dim;                                                              \
    T partial[LANES] = {0};                                                                      \
    int64_t i = 0;                                                                               \
    for (; i + LANES <= dim; i += LANES)                                                         \
      for (int k = 0; k < LANES; ++k) partial[k] += v[i + k] * v[i + k];                         \
    for (int k = 0; i < dim; ++i, ++k) partial[k] += v[i] * v[i];                                \
    T total = 0;                                                                                 \
    for (int k = 0; k < LANES; ++k) total += partial[k];                                         \
    out[r] = total;                                                                              \
  }                                                                                              \
}

#define UNIT_SUMS(NAME, T, SQRT)                                                                        \
/* adds each of `rows` rows of `dim` values, divided by its norm (at least `eps`), to the row of \
   `sums` of its class, rows in order; the threads share the columns, so no two add to one value */ \
void NAME(const T* vectors, int64_t rows, int64_t dim, const T* squared_norms,                   \
          const int64_t* classes, T eps, T* sums, int64_t threads) {                             \
  const int64_t width = 64, slices = (dim + width - 1) / width;                                  \
  _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
  for (int64_t slice = 0; slice < slices; ++slice) {                                             \
    const int64_t first = slice * width, last = first + width < dim ? first + width : dim;       \
    for (int64_t r = 0; r < rows; ++r) {                                                         \
      const T norm = SQRT(squared_norms[r]);                                                     \
      const T d = norm > eps ? norm : eps;                                                       \
      const T* restrict v = vectors + r * dim;                                                   \
      T* restrict s = sums + classes[r] * dim;                                                   \
      for (int64_t i = first; i < last; ++i) s[i] += v[i] / d;                                   \
    }                                                                                            \
  }                                                                                              \
}

UNIT_SUMS(unit_sums_f32, float, sqrtf)
UNIT_SUMS(unit_sums_f64, double, sqrt)
#define LANES 16
NORMS(squared_norms_f32, float)
NORMS(squared_norms_f64, double)
KERNEL(knn_block_f32, float, uint32_t, sqrtf)
KERNEL(knn_block_f64, double, uint64_t, sqrt)
"""


@dataclass(frozen=True)
class Ranking:
    """What the blocks so far leave of one chunk: per query its `depth` most similar items
    (values and gallery indices, most similar first), its nearest item (distance and index)
    and its distance sums per class."""

    values: Tensor
    items: Tensor
    filled: Tensor
    nearest_values: Tensor
    nearest_items: Tensor
    sums: Tensor


def native():
    """The compiled kernels (a ctypes library), or None where they cannot be built or are
    disabled by TAXONCLIP_KNN_NATIVE=0."""
    if os.environ.get(ENABLE_VARIABLE, "1") == "0":
        return None
    return _compiled()


@functools.cache
def _compiled():
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    library = None
    # with OpenMP first: its runtime is the one torch loaded (libgomp.so.1) where torch uses
    # OpenMP, so the kernel runs on the threads that just computed the products
    for flags in ((*FLAGS, "-fopenmp"), FLAGS):
        library = _built(compiler, flags)
        if library is not None:
            library.with_openmp = "-fopenmp" in flags
            break
    if library is None:
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    arguments = [pointer, integer, integer, integer, integer, pointer, pointer, pointer, pointer, integer,
                 integer, pointer, pointer, pointer, pointer, pointer, pointer, pointer]
    for kernel in (library.knn_block_f32, library.knn_block_f64):
        kernel.restype = None
        kernel.argtypes = arguments
    for kernel in (library.knn_block_f32_rows, library.knn_block_f64_rows):
        kernel.restype = None
        kernel.argtypes = [pointer, integer, *arguments[3:], integer, integer]
    for function in (library.squared_norms_f32, library.squared_norms_f64):
        function.restype = None
        function.argtypes = [pointer, integer, integer, pointer, integer]
    for function, real in ((library.unit_sums_f32, ctypes.c_float), (library.unit_sums_f64, ctypes.c_double)):
        function.restype = None
        function.argtypes = [pointer, integer, integer, pointer, pointer, real, pointer, integer]
    return library


def _built(compiler: str, flags: tuple[str, ...]):
    """SOURCE compiled with these flags and loaded, or None."""
    folder = Path(tempfile.mkdtemp(prefix="taxonclip-knn-"))
    try:
        (folder / "scan.c").write_text(SOURCE)
        built = subprocess.run([compiler, *flags, "-o", str(folder / "scan.so"), str(folder / "scan.c")],
                               capture_output=True, timeout=120, check=False)
        if built.returncode != 0:
            return None
        return ctypes.CDLL(str(folder / "scan.so"))
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def supports(query: Tensor) -> bool:
    """Whether the kernels can scan this chunk's products: float32 or float64 on the CPU."""
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64) and native() is not None


def squared_norms(vectors: Tensor, out: Tensor | None = None) -> Tensor:
    """The squared L2 norm of each row of `vectors` (a CPU matrix that `supports`), into `out`."""
    vectors = vectors.contiguous()
    out = torch.empty(len(vectors), dtype=vectors.dtype) if out is None else out
    name = "squared_norms_f32" if vectors.dtype == torch.float32 else "squared_norms_f64"
    getattr(native(), name)(vectors.data_ptr(), len(vectors), vectors.shape[1], out.data_ptr(),
                            torch.get_num_threads())
    return out


def add_unit_vectors(sums: Tensor, vectors: Tensor, squared_norms: Tensor, classes: Tensor,
                     eps: float) -> Tensor:
    """`sums` (classes x dim) plus, per class, the sum of its `vectors` (a CPU matrix that
    `supports`) divided by their norms (sqrt of `squared_norms`, at least `eps`), in row order."""
    vectors, squared_norms, classes = vectors.contiguous(), squared_norms.contiguous(), classes.contiguous()
    name = "unit_sums_f32" if vectors.dtype == torch.float32 else "unit_sums_f64"
    getattr(native(), name)(vectors.data_ptr(), len(vectors), vectors.shape[1], squared_norms.data_ptr(),
                            classes.data_ptr(), eps, sums.data_ptr(), torch.get_num_threads())
    return sums


def start(rows: int, depth: int, n_classes: int, dtype: torch.dtype) -> Ranking:
    """The state of a chunk before its first block."""
    return Ranking(values=torch.empty(rows, depth, dtype=dtype),
                   items=torch.zeros(rows, depth, dtype=torch.int64),
                   filled=torch.zeros(rows, dtype=torch.int64),
                   nearest_values=torch.full((rows,), float("inf"), dtype=dtype),
                   nearest_items=torch.zeros(rows, dtype=torch.int64),
                   sums=torch.zeros(rows, n_classes, dtype=dtype))


def scan(state: Ranking, products: Tensor, offset: int, query_squared_norms: Tensor,
         squared_norms: Tensor, inverse_norms: Tensor, classes: Tensor) -> None:
    """Add one block of products (queries x the items from `offset`, whose squared norms,
    inverse norms and classes are given) to `state`, the queries split among torch's threads."""
    products = products.contiguous()
    rows, items = products.shape
    vectors = [query_squared_norms.contiguous(), squared_norms.contiguous(),
               inverse_norms.contiguous(), classes.contiguous()]
    library = native()
    name = "knn_block_f32" if products.dtype == torch.float32 else "knn_block_f64"
    threads = torch.get_num_threads()
    stride = 3 * items + items // 16 + 1  # cosines, two rows of distances, group maxima
    common = (items, offset, *(vector.data_ptr() for vector in vectors), state.sums.shape[1],
              state.values.shape[1], state.values.data_ptr(), state.items.data_ptr(), state.filled.data_ptr(),
              state.nearest_values.data_ptr(), state.nearest_items.data_ptr(), state.sums.data_ptr())
    if library.with_openmp:
        scratch = torch.empty(threads, stride, dtype=products.dtype)
        getattr(library, name + "_rows")(products.data_ptr(), rows, *common, scratch.data_ptr(), stride, threads)
        return
    kernel = getattr(library, name)
    # more parts than threads: where other work deschedules a thread, the others take its parts
    parts = max(1, min(threads * PARTS_PER_THREAD if threads > 1 else 1, rows // 16))
    bounds = [rows * part // parts for part in range(parts + 1)]
    scratch = torch.empty(parts, stride, dtype=products.dtype)

    def run(part: int) -> None:
        kernel(products.data_ptr(), bounds[part], bounds[part + 1], *common, scratch[part].data_ptr())

    if parts == 1:
        run(0)
    else:
        list(_pool(threads).map(run, range(parts)))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    # ctypes releases the GIL while a kernel runs: the threads share the cores as torch's do
    return ThreadPoolExecutor(workers, thread_name_prefix="taxonclip-knn")
