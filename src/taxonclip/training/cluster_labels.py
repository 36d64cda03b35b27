"""label=cluster: the training rows labelled by k-means clusters of the starting model's
embeddings (UNICOM's cluster discrimination), with the clusters' agreement with species and
genus logged; a resumed run trains on the clusters it logged."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from taxonclip import clusters, names
from taxonclip import distributed as dist
from taxonclip.diskio import scratch_folder
from taxonclip.embed import embed_visual
from taxonclip.errors import DataError
from taxonclip.training.context import TrainContext
from taxonclip.training.data import TrainData


def with_cluster_labels(ctx: TrainContext, encoder) -> TrainData:
    """The training rows labelled by k-means clusters of the starting model's embeddings (or
    those of the run it resumes, which rank 0 reads); every rank receives them."""
    logged = _logged_assignment(ctx) if ctx.info.is_main and ctx.config.resume else None
    logged = dist.broadcast_object(logged)
    assignment = logged if logged is not None else dist.broadcast_object(_cluster(ctx, encoder))
    return replace(ctx.data, labels=assignment.astype(np.int64),
                   classes=[f"cluster {i}" for i in range(int(assignment.max()) + 1)])


def _cluster(ctx: TrainContext, encoder) -> np.ndarray | None:
    """Embed the training images (every rank its share), cluster them on rank 0, and log the
    k-means seconds, the clusters' NMI and ARI against species and genus, and each image's
    cluster; the assignment on rank 0, None on the other ranks."""
    data, config = ctx.data, ctx.config
    rows = data.manifest.table.iloc[data.rows].reset_index(drop=True)
    k = clusters.cluster_count(config.clusters, rows["species"].nunique(), len(rows))
    vectors, kept = embed_visual(encoder.to(ctx.device), replace(data.manifest, table=rows),
                                 config.eval_config(), ctx.device, spread=True)
    if len(kept) < len(rows):
        raise DataError(f"{len(rows) - len(kept)} training images did not decode; label=cluster "
                        f"clusters every training image (fix them, or drop them from the manifest)")
    if vectors is None:  # another rank than 0: its share went to rank 0
        return None
    start = time.perf_counter()
    assignment, _ = clusters.kmeans(vectors, k, config.data.seed)
    metrics = {names.CLUSTER_COUNT: k, names.CLUSTER_KMEANS_SECONDS: time.perf_counter() - start}
    for level in ("species", "genus"):
        known = rows[level].notna().to_numpy()
        if known.any():
            truth = rows[level].to_numpy()[known]
            metrics[names.cluster_purity("nmi", level)] = clusters.normalized_mutual_information(
                truth, assignment[known])
            metrics[names.cluster_purity("ari", level)] = clusters.adjusted_rand_index(
                truth, assignment[known])
    ctx.run.log_metrics(metrics)
    ctx.run.log_text(pd.DataFrame({"image_id": rows["image_id"], "cluster": assignment})
                     .to_csv(index=False), names.CLUSTER_ASSIGNMENT)
    return assignment


def _logged_assignment(ctx: TrainContext) -> np.ndarray | None:
    """The clusters a resumed run trained on, in the order of the training rows."""
    folder = Path(names.CLUSTER_ASSIGNMENT).parent.as_posix()
    if names.CLUSTER_ASSIGNMENT not in ctx.run.list_artifacts(folder):
        return None
    with scratch_folder() as scratch:
        logged = pd.read_csv(ctx.run.download(names.CLUSTER_ASSIGNMENT, scratch))
    by_image = logged.set_index("image_id")["cluster"]
    return by_image.loc[ctx.data.manifest.table["image_id"].iloc[ctx.data.rows]].to_numpy()
