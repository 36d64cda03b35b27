"""One pass of C over the products of a chunk of queries with a block of gallery items, in place
of knn's passes of torch.

For each query it keeps, across the blocks of the gallery: the `depth` most similar items by
cosine (most similar first, ties to the lower index), the nearest item by Euclidean distance
(ties to the lower index) and the sums of its distances and of its cosines to the items of each
class, from the same products, read once while they are in the processor's cache; after the
last block, each query's Outcomes: its hits, average precision and prediction. knn's torch
operations read and write every product four to eight times, which took about as long as the
products themselves on 2-core CPUs.

The products come item by item (items x queries), so that the products of one item with a strip
of 16 queries are contiguous: the kernel works on a strip at once in the vector registers, and
the class sums of a strip are vectors too.

Where torch links a BLAS whose ?gemm passes a check (MKL's on x86), the kernel makes the products
itself (`fused`): each thread takes a share of the chunk's queries and calls the BLAS on one tile
of about 1 MB of products at a time, which its strips pass over at once, from the core's own
cache; the products with torch in one call were read back from the shared cache or memory. Then
every strip ranks the block, reading back only the products of the items that can enter its
ranking, fetched ahead for all 16 rows at once. Elsewhere torch makes the products
(`products.block_products`) and `scan` takes them in pieces.

The C source (knn_scan.c, with knn_scan_kernel.h once per type) is compiled at the first use in a
process, with the system's C compiler, into a temporary folder (removed at once; the loaded
library stays mapped). Where no compiler works, `native()` is None and knn keeps its torch
operations, which give the same rankings and nearest items; sums may differ in the last bit, as
torch's vectorised square root is not always correctly rounded.

Built with OpenMP where the compiler has it, the kernel shares the strips among the threads of
the OpenMP runtime already loaded (torch's), which computed the products just before: on 2 cores a
separate pool of threads competed with them; inside its parallel region, the BLAS runs on the
calling thread alone. Without OpenMP, parts of the strips run on a pool of Python threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
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
# x86 processors with AVX-512: a strip of 16 float32 values in one register, not two (the kernel
# ran 9% faster); no effect on the others
X86_FLAGS = ("-mprefer-vector-width=512",)
ENABLE_VARIABLE = "TAXONCLIP_KNN_NATIVE"  # "0": always knn's torch operations

SOURCE = Path(__file__).with_name("knn_scan.c")  # includes knn_scan_kernel.h, once per type

LANES = 16  # queries per strip of the kernel (LANES in SOURCE)
PIECE_STRIPS = 11  # strips per piece of products that `scan` takes, about (see `pieces`)
PIECE_ROWS = (PIECE_STRIPS + 2) * LANES  # the most rows a piece has
GROUP = 16  # items whose largest cosine screens them (GROUP in SOURCE); tiles are made of groups
# products of a share with one tile of items in `fused`, kept in a core's cache (2 MB here): 1 MB
# ran faster than 0.25, 0.5 and 1.5 MB (fewer calls of the BLAS, each packing the share anew)
TILE_BYTES = 1 << 20
PRODUCTS, PASSES, RANKINGS = 1, 2, 4  # the phases of knn_fused
PIECES_TOGETHER = 2  # pieces `scan` shares among the threads at once (their products alive together)


class _State(ctypes.Structure):
    # the kernel's view of a Ranking (FN(state) in knn_scan_kernel.h)
    _fields_ = [("rows", ctypes.c_int64), ("queries", ctypes.c_int64), ("depth", ctypes.c_int64),
                ("n_classes", ctypes.c_int64), ("top_values", ctypes.c_void_p),
                ("top_items", ctypes.c_void_p), ("filled", ctypes.c_void_p),
                ("nearest_values", ctypes.c_void_p), ("nearest_items", ctypes.c_void_p),
                ("sums", ctypes.c_void_p), ("query_classes", ctypes.c_void_p),
                ("gallery_classes", ctypes.c_void_p), ("counts", ctypes.c_void_p), ("hits", ctypes.c_void_p),
                ("precision", ctypes.c_void_p), ("prediction", ctypes.c_void_p)]


class _Block(ctypes.Structure):
    # one block of gallery items (FN(items) in knn_scan_kernel.h)
    _fields_ = [("items", ctypes.c_int64), ("offset", ctypes.c_int64), ("last", ctypes.c_int64),
                ("squared_norms", ctypes.c_void_p),
                ("inverse_norms", ctypes.c_void_p), ("classes", ctypes.c_void_p)]


HITS = 6  # columns of Outcomes.hits


@dataclass(frozen=True)
class Outcomes:
    """Per query of a scanned chunk, in `hits` (queries x HITS, 0 or 1): whether its class is that
    of one of its 1, 3 and 5 most similar items, of best mean cosine, of its nearest item and of
    least mean distance (mean ties to the lower class); its average precision at R, R being its
    class's count in the gallery (NaN where 0), and the class of its most similar item."""

    hits: Tensor
    precision: Tensor
    prediction: Tensor


@dataclass(frozen=True)
class Block:
    """One block of gallery items, as the kernel reads it: their squared norms, inverse norms and
    classes (contiguous, kept alive here) and the index of the first."""

    squared_norms: Tensor
    inverse_norms: Tensor
    classes: Tensor
    struct: _Block


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
    machine = X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ()
    for flags in ((*FLAGS, *machine, "-fopenmp"), (*FLAGS, *machine)):
        library = _built(compiler, flags)
        if library is not None:
            library.with_openmp = "-fopenmp" in flags
            break
    if library is None:
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    # products, their stride, the state's first row, query squared norms, block, state, scratch
    for kernel in (library.knn_block_f32, library.knn_block_f64):
        kernel.restype = None
        kernel.argtypes = [pointer, integer, integer, integer, integer, pointer, pointer, pointer, pointer]
    for kernel in (library.knn_pieces_f32, library.knn_pieces_f64):
        kernel.restype = None  # products, strides and first rows of `count` pieces, then as above
        kernel.argtypes = [pointer, pointer, pointer, integer, pointer, pointer, pointer, pointer, integer, integer]
    for kernel in (library.knn_fused_f32, library.knn_fused_f64):
        kernel.restype = None  # gemm, queries, dim, vectors, tile, firsts, rows, count, query norms,
        # block, state, products and their stride, carried and its stride, scratch and its stride,
        # slot, threads, phases
        kernel.argtypes = [pointer, pointer, integer, pointer, integer, pointer, pointer, integer, pointer,
                           pointer, pointer, pointer, integer, pointer, integer, pointer, integer, integer,
                           integer, integer]
    library.scratch_bytes.restype = integer
    library.scratch_bytes.argtypes = [integer, integer, integer]
    library.strip_bytes.restype = integer
    library.strip_bytes.argtypes = [integer, integer]
    for function in (library.squared_norms_f32, library.squared_norms_f64):
        function.restype = None
        function.argtypes = [pointer, integer, integer, pointer, integer]
    return library


def _built(compiler: str, flags: tuple[str, ...]):
    """SOURCE compiled with these flags and loaded, or None."""
    folder = Path(tempfile.mkdtemp(prefix="taxonclip-knn-"))
    try:
        built = subprocess.run([compiler, *flags, "-o", str(folder / "scan.so"), str(SOURCE)],
                               capture_output=True, timeout=120, check=False)
        if built.returncode != 0:
            return None
        return ctypes.CDLL(str(folder / "scan.so"))
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels work on values of this type on this device: float32 or float64 on
    the CPU, where they are built."""
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64) and native() is not None


def gemm(dtype: torch.dtype) -> int | None:
    """The address of the BLAS ?gemm of this type (float32, float64) that torch links (MKL's on
    x86), with which `fused` makes the products in the kernel, else None. It is tried once on a
    small product with an exact answer: anything but that answer leaves the products to torch."""
    return _gemm("sgemm_" if dtype == torch.float32 else "dgemm_", dtype)


@functools.cache
def _gemm(name: str, dtype: torch.dtype) -> int | None:
    function = None
    # torch's own library first (the BLAS torch itself calls), then any the process has loaded
    for library in (str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"), None):
        try:
            function = getattr(ctypes.CDLL(library), name)
            break
        except (OSError, AttributeError):
            continue
    if function is None:
        return None
    scalar, integer = (ctypes.c_float if dtype == torch.float32 else ctypes.c_double), ctypes.c_int
    query = torch.arange(6, dtype=dtype).reshape(2, 3)
    gallery = torch.arange(12, dtype=dtype).reshape(4, 3) - 5
    out = torch.zeros(4, 2, dtype=dtype)
    m, n, k = integer(2), integer(4), integer(3)
    one, zero = scalar(1), scalar(0)
    pointers = [ctypes.c_void_p(tensor.data_ptr()) for tensor in (query, gallery, out)]
    function(b"T", b"N", *map(ctypes.byref, (m, n, k, one)), pointers[0], ctypes.byref(k), pointers[1],
             ctypes.byref(k), ctypes.byref(zero), pointers[2], ctypes.byref(m))
    exact = torch.equal(out, gallery @ query.T)
    return ctypes.cast(function, ctypes.c_void_p).value if exact else None


def squared_norms(vectors: Tensor, out: Tensor | None = None) -> Tensor:
    """The squared L2 norm of each row of `vectors` (a CPU matrix that `supports`), into `out`."""
    vectors = vectors.contiguous()
    out = torch.empty(len(vectors), dtype=vectors.dtype) if out is None else out
    name = "squared_norms_f32" if vectors.dtype == torch.float32 else "squared_norms_f64"
    getattr(native(), name)(vectors.data_ptr(), len(vectors), vectors.shape[1], out.data_ptr(),
                            torch.get_num_threads())
    return out


def pieces(rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of the pieces in which `scan` takes the products of `rows` padded queries
    (a multiple of LANES): an odd number of strips each, about PIECE_STRIPS. One query's products
    with successive items then lie an odd number of cache lines apart and fall in every set of the
    cache: with an even number, the sets a strip used were fewer than its lines, and the kernel
    took up to 20% longer. As odd numbers add up to a number of their count's parity, an even
    number of strips goes in an even number of pieces."""
    strips = rows // LANES
    count = -(-strips // PIECE_STRIPS)
    count += count % 2 != strips % 2
    base, extra = divmod(strips, count)
    sizes = [base + (piece < extra) for piece in range(count)]
    even = [piece for piece, size in enumerate(sizes) if size % 2 == 0]  # an even number of them
    for raised, lowered in zip(even[::2], even[1::2]):
        sizes[raised] += 1
        sizes[lowered] -= 1
    starts = [sum(sizes[:piece]) * LANES for piece in range(count)]
    return [(start, size * LANES) for start, size in zip(starts, sizes)]


def padded(query: Tensor) -> Tensor:
    """`query` with rows of zeros appended up to a multiple of LANES rows, as `scan` needs
    them (itself where it has such a number)."""
    extra = -len(query) % LANES
    return query if extra == 0 else torch.cat([query, query.new_zeros(extra, query.shape[1])])


@dataclass(frozen=True)
class Buffers:
    """Memory that every chunk of one evaluation reuses (fresh memory on every chunk cost page
    faults): the state of a chunk of at most `rows` padded rows, one scratch per thread and,
    where `fused` makes the products, a buffer of products per thread and what each strip
    carries from tile to tile (else empty)."""

    rows: int
    depth: int
    n_classes: int
    query_squared_norms: Tensor
    values: Tensor
    items: Tensor
    filled: Tensor
    nearest_values: Tensor
    nearest_items: Tensor
    sums: Tensor
    scratch: Tensor
    products: Tensor
    carried: Tensor


def buffers(rows: int, depth: int, n_classes: int, items: int, dtype: torch.dtype) -> Buffers:
    """Buffers for chunks of at most `rows` queries ranked at most `depth` deep among `n_classes`
    classes, and blocks of at most `items` items."""
    rows += -rows % LANES
    threads, size = torch.get_num_threads(), torch.finfo(dtype).bits // 8
    fusing = gemm(dtype) is not None
    width = max(size for _, size in shares(rows, threads)) + LANES if fusing else 0
    carried = rows // LANES * native().strip_bytes(items, size) if fusing else 0
    return Buffers(rows=rows, depth=depth, n_classes=n_classes,
                   query_squared_norms=torch.empty(rows, dtype=dtype),
                   values=torch.empty(rows * depth, dtype=dtype), items=torch.empty(rows * depth, dtype=torch.int64),
                   filled=torch.empty(rows, dtype=torch.int64), nearest_values=torch.empty(rows, dtype=dtype),
                   nearest_items=torch.empty(rows, dtype=torch.int64),
                   sums=torch.empty(rows * n_classes * 2, dtype=dtype),
                   scratch=torch.empty(threads, native().scratch_bytes(items, depth, size), dtype=torch.uint8),
                   products=torch.empty(threads, items * width, dtype=dtype),
                   carried=torch.empty(carried, dtype=torch.uint8))


def tile_items(width: int, size: int) -> int:
    """Gallery items per tile of `fused` for shares `width` values wide (padding included)."""
    return max(GROUP, TILE_BYTES // (width * size) // GROUP * GROUP)


def shares(rows: int, threads: int) -> list[tuple[int, int]]:
    """(first row, rows) of each thread's share of `rows` padded rows in `knn_fused`: their strips
    in as many near-equal parts as threads (or strips, where fewer)."""
    strips = rows // LANES
    parts = max(1, min(threads, strips))
    bounds = [strips * part // parts * LANES for part in range(parts + 1)]
    return [(bounds[part], bounds[part + 1] - bounds[part]) for part in range(parts)]


@dataclass(frozen=True)
class Ranking:
    """What the blocks so far leave of one chunk of `queries` queries, `depth` deep, in `buffers`
    (from their start, in rows padded to a multiple of LANES): per query its `depth` most similar
    items (values and gallery indices, most similar first), its nearest item (distance and
    index), and per class the sums of its distances and of its cosines (not divided by the
    query's norm) to the class's items (strips x classes x 2 x LANES: a strip's are contiguous)."""

    queries: int
    depth: int
    buffers: Buffers
    classes: tuple[Tensor, Tensor, Tensor]  # the queries', the gallery items' and each class's count
    found: Outcomes  # filled once the last block is scanned
    struct: _State  # what the kernel reads and updates, pointing into `buffers`

    @property
    def rows(self) -> int:
        """The padded rows of the chunk."""
        return self.queries + -self.queries % LANES

    def ranked(self) -> tuple[Tensor, Tensor]:
        """Values and gallery indices of each query's most similar items."""
        size = self.rows * self.depth
        return (self.buffers.values[:size].view(self.rows, self.depth)[:self.queries],
                self.buffers.items[:size].view(self.rows, self.depth)[:self.queries])

    def nearest(self) -> tuple[Tensor, Tensor]:
        """Distance and gallery index of each query's nearest item."""
        return self.buffers.nearest_values[:self.queries], self.buffers.nearest_items[:self.queries]

    def distance_sums(self) -> Tensor:
        """Each query's sums of distances per class (queries x classes)."""
        return self._per_query(0)

    def cosine_sums(self) -> Tensor:
        """Each query's sums of cosines per class (queries x classes)."""
        return self._per_query(1)

    def _per_query(self, which: int) -> Tensor:
        classes = self.buffers.n_classes
        sums = self.buffers.sums[:self.rows * classes * 2].view(self.rows // LANES, classes, 2, LANES)
        return sums[:, :, which].transpose(1, 2).reshape(self.rows, classes)[:self.queries]


def start(buffers: Buffers, query_squared_norms: Tensor, depth: int, query_classes: Tensor,
          gallery_classes: Tensor, counts: Tensor) -> Ranking:
    """The state of a chunk of queries (their squared norms and classes) before its first block,
    in `buffers`, for a gallery of items of these classes, whose counts are given."""
    queries = len(query_squared_norms)
    rows = queries + -queries % LANES
    if rows > buffers.rows or depth > buffers.depth:
        raise ValueError(f"a chunk of {queries} queries ranked {depth} deep in buffers for "
                         f"{buffers.rows} rows, {buffers.depth} deep")
    norms = buffers.query_squared_norms[:rows]
    norms[:queries] = query_squared_norms
    norms[queries:] = 0
    classes = (query_classes.contiguous(), gallery_classes.contiguous(), counts.contiguous())
    found = _outcomes(queries)
    # views of the buffers from their start: the pointers are the buffers'
    struct = _State(rows, queries, depth, buffers.n_classes, *(getattr(buffers, name).data_ptr() for name in (
        "values", "items", "filled", "nearest_values", "nearest_items", "sums")),
        *(tensor.data_ptr() for tensor in (*classes, found.hits, found.precision, found.prediction)))
    # the kernel starts every row afresh at the first block (offset 0): nothing else to clear
    return Ranking(queries=queries, depth=depth, buffers=buffers, classes=classes, found=found, struct=struct)


def block(offset: int, squared_norms: Tensor, inverse_norms: Tensor, classes: Tensor, last: bool) -> Block:
    """The block of gallery items from `offset` on, with these squared norms, inverse norms and
    classes, for `scan`; after the `last` block of the gallery, `scan` fills the Outcomes."""
    tensors = [squared_norms.contiguous(), inverse_norms.contiguous(), classes.contiguous()]
    return Block(*tensors, struct=_Block(len(classes), offset, int(last), *(tensor.data_ptr() for tensor in tensors)))


def scan(state: Ranking, pieces: list[tuple[int, Tensor]], items: Block) -> None:
    """Add to `state` the products of a block of items with pieces of the chunk's `padded`
    queries: (first row, products: items x rows) each. The strips of all the pieces are shared
    among the threads `start` found: PIECES_TOGETHER at once keep them busy to the end."""
    pieces = [(first, products.contiguous()) for first, products in pieces]
    for first, products in pieces:
        rows = products.shape[1]
        if rows % LANES or first % LANES or first + rows > state.rows or len(products) != items.struct.items:
            raise ValueError(f"products of {tuple(products.shape)} from row {first} for a ranking of "
                             f"{state.rows} rows and a block of {items.struct.items} items")
    library = native()
    suffix = "_f32" if state.buffers.values.dtype == torch.float32 else "_f64"
    threads, stride = state.buffers.scratch.shape
    arguments = (ctypes.byref(items.struct), ctypes.byref(state.struct))
    norms, scratch = state.buffers.query_squared_norms.data_ptr(), state.buffers.scratch.data_ptr()
    if library.with_openmp:
        count = len(pieces)
        getattr(library, "knn_pieces" + suffix)(
            (ctypes.c_void_p * count)(*(products.data_ptr() for _, products in pieces)),
            (ctypes.c_int64 * count)(*(products.shape[1] for _, products in pieces)),
            (ctypes.c_int64 * count)(*(first for first, _ in pieces)), count, norms, *arguments, scratch,
            stride, threads)
        return
    kernel = getattr(library, "knn_block" + suffix)
    for first, products in pieces:
        rows = products.shape[1]
        strips = rows // LANES
        # no more parts than threads, as each has its scratch; a pool thread takes the next part free
        parts = max(1, min(threads, strips))
        bounds = [strips * part // parts for part in range(parts + 1)]

        def run(part: int) -> None:
            kernel(products.data_ptr(), rows, first, bounds[part], bounds[part + 1], norms, *arguments,
                   scratch + part * stride)

        if parts == 1:
            run(0)
        else:
            list(_pool(threads).map(run, range(parts)))


def fused(state: Ranking, query: Tensor, vectors: Tensor, items: Block, products_only: bool = False) -> None:
    """Add to `state` a block of gallery items (`vectors`, items x dim, described by `items`):
    their products with the chunk's `padded` queries, made by `gemm` in the kernel a tile at a
    time, pass through the kernel while they are in the processor's cache (with `products_only`,
    the products alone, to time them)."""
    query, vectors = query.contiguous(), vectors.contiguous()
    if len(query) != state.rows or len(vectors) != items.struct.items:
        raise ValueError(f"{len(query)} padded queries and {len(vectors)} items for a ranking of "
                         f"{state.rows} rows and a block of {items.struct.items} items")
    library, buffers = native(), state.buffers
    threads, stride = buffers.scratch.shape
    parts = shares(state.rows, threads)
    tile = tile_items(max(rows for _, rows in parts) + LANES, buffers.values.element_size())
    kernel = getattr(library, "knn_fused_f32" if buffers.values.dtype == torch.float32 else "knn_fused_f64")
    common = (buffers.query_squared_norms.data_ptr(), ctypes.byref(items.struct), ctypes.byref(state.struct),
              buffers.products.data_ptr(), buffers.products.shape[1], buffers.carried.data_ptr(),
              len(buffers.carried) // (buffers.rows // LANES), buffers.scratch.data_ptr(), stride)

    def run(first: int, count: int, threads: int, phases: int) -> None:
        kernel(gemm(buffers.values.dtype), query.data_ptr(), query.shape[1], vectors.data_ptr(), tile,
               (ctypes.c_int64 * count)(*(start for start, _ in parts[first:first + count])),
               (ctypes.c_int64 * count)(*(rows for _, rows in parts[first:first + count])), count,
               *common, first, threads, phases)

    if products_only:
        run(0, len(parts), threads, PRODUCTS)
    elif library.with_openmp or len(parts) == 1:
        run(0, len(parts), threads, PRODUCTS | PASSES | RANKINGS)
    else:  # each part's products and passes on a Python thread, then its rankings
        for phases in (PRODUCTS | PASSES, RANKINGS):
            list(_pool(threads).map(lambda part: run(part, 1, 1, phases), range(len(parts))))


def _outcomes(queries: int) -> Outcomes:
    """Room for the Outcomes of a chunk of `queries` queries, which `scan` fills after the last block."""
    return Outcomes(hits=torch.empty(queries, HITS, dtype=torch.uint8),
                    precision=torch.empty(queries, dtype=torch.float64),
                    prediction=torch.empty(queries, dtype=torch.int64))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    # ctypes releases the GIL while a kernel runs: the threads share the cores as torch's do
    return ThreadPoolExecutor(workers, thread_name_prefix="taxonclip-knn")
