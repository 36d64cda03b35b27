"""The torch.distributed helpers in one process, and PartialFC sharded over 2 gloo processes
against the single-process full softmax."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from taxonclip import distributed
from taxonclip.errors import ConfigError, DataError
from taxonclip.losses import CombinedMarginLoss, PartialFC, class_shard
from taxonclip.config import DataConfig, EvalConfig, LossConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.models import create_model
from taxonclip.training.loop import TrainState, train_step
from tests.helpers import free_port

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
S, M2 = 16.0, 0.3
NUM_CLASSES, INPUT_SIZE, EMBEDDING_SIZE = 9, 6, 4
ROWS_OF_RANK = (slice(0, 4), slice(4, 7))  # a global batch of 7, split unevenly
LABELS = [0, 8, 4, 5, 8, 2, 6]
SAMPLED_LABELS = [1, 7, 1, 7, 1, 7, 7]
SPAWN_TIMEOUT_S = 60
COMPILE_TIMEOUT_S = 300
TRAIN_STEPS = 3


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_single_process_without_torchrun(no_torchrun):
    info = distributed.init_from_env("cpu")
    assert info == distributed.DistInfo(rank=0, world_size=1, device=torch.device("cpu"))
    assert info.is_main
    assert not distributed.is_distributed()


def test_auto_device_is_cuda_when_available(no_torchrun):
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.init_from_env().device.type == want


@pytest.mark.parametrize("device", ["gpu", "tpu:0", "cuda:x"])
def test_unknown_device_is_a_config_error(no_torchrun, device):
    with pytest.raises(ConfigError, match="'device'"):
        distributed.init_from_env(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error(no_torchrun):
    with pytest.raises(ConfigError, match="no CUDA device"):
        distributed.init_from_env("cuda")


def test_malformed_torchrun_variable_is_a_config_error(no_torchrun, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.init_from_env("cpu")


def test_helpers_are_the_identity_without_a_group():
    x = torch.randn(3, 2)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.all_gather_no_grad(x) is x
    assert distributed.all_reduce(x, "max") is x
    assert distributed.broadcast_object({"run_id": "abc"}) == {"run_id": "abc"}
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    distributed.barrier()
    distributed.shutdown()


def test_all_reduce_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="mean"):
        distributed.all_reduce(torch.zeros(1), "mean")


def shared_case() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The backbone, inputs and full centre matrix every process builds identically."""
    generator = torch.Generator().manual_seed(11)
    backbone = nn.Linear(INPUT_SIZE, EMBEDDING_SIZE)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(EMBEDDING_SIZE, INPUT_SIZE, generator=generator))
        backbone.bias.copy_(torch.randn(EMBEDDING_SIZE, generator=generator))
    inputs = torch.randn(len(LABELS), INPUT_SIZE, generator=generator)
    centres = torch.randn(NUM_CLASSES, EMBEDDING_SIZE, generator=generator)
    return backbone, inputs, centres


def sharded_step(rank: int, sample_rate: float, labels: list[int]) -> dict:
    """One PartialFC step on this rank's rows, with this rank's block of the shared centres."""
    backbone, inputs, centres = shared_case()
    module = PartialFC(CombinedMarginLoss.from_config(LossConfig(s=S, m2=M2)), EMBEDDING_SIZE, NUM_CLASSES, sample_rate)
    start, count = class_shard(NUM_CLASSES, 2, rank)
    module.weight.data.copy_(centres[start: start + count])
    rows = ROWS_OF_RANK[rank]
    loss = module(backbone(inputs[rows]), torch.tensor(labels[rows]))
    loss.backward()
    return {"loss": loss.item(), "backbone_weight": backbone.weight.grad,
            "backbone_bias": backbone.bias.grad, "centres": module.weight.grad,
            "full_centres": module.full_centres(), "sampled": module.last_sampled_classes}


def training_state(rank: int, world_size: int) -> TrainState:
    """The shared backbone with PartialFC over this rank's block of the shared centres, AdamW
    and a constant schedule, as `train.build_state` assembles them (replica: DDP in a group)."""
    backbone, _, centres = shared_case()
    encoder = nn.Module()
    encoder.visual = backbone
    head = PartialFC(CombinedMarginLoss.from_config(LossConfig(s=S, m2=M2)), EMBEDDING_SIZE, NUM_CLASSES, 1.0)
    start, count = class_shard(NUM_CLASSES, world_size, rank)
    head.weight.data.copy_(centres[start: start + count])
    optimizer = torch.optim.AdamW([{"params": backbone.parameters()},
                                   {"params": head.parameters()}], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    replica = distributed.data_parallel(backbone, torch.device("cpu"))
    return TrainState(encoder, head, optimizer, scheduler, replica)


def global_micro_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and labels of one global micro-batch (every rank's rows together)."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    inputs = torch.randn(len(LABELS), INPUT_SIZE, generator=generator)
    return inputs, torch.randint(0, NUM_CLASSES, (len(LABELS),), generator=generator)


def train_steps(rank: int, world_size: int, grad_accum: int, compiled: bool = False) -> dict:
    """TRAIN_STEPS steps of the real `train_step`, each of `grad_accum` micro-batches of this
    rank's rows (all rows in one process), through `torch.compile` of the replica as training's
    `compile=true` runs it if `compiled`; the backbone and its last gradient at the end, and
    how many buckets of backbone gradients the DDP hook sent."""
    sent = []
    real_hook = distributed.sum_gradients_hook

    def counting_hook(group, bucket):
        sent.append(bucket.index())
        return real_hook(group, bucket)

    distributed.sum_gradients_hook = counting_hook
    state = training_state(rank, world_size)
    forward = torch.compile(state.replica) if compiled else state.replica
    rows = ROWS_OF_RANK[rank] if world_size > 1 else slice(None)
    for step in range(TRAIN_STEPS):
        batches = [tuple(part[rows] for part in global_micro_batch(step, micro))
                   for micro in range(grad_accum)]
        train_step(state, batches, forward, torch.device("cpu"))
    distributed.sum_gradients_hook = real_hook
    backbone = state.encoder.visual
    return {"weight": backbone.weight.detach().clone(), "bias": backbone.bias.detach().clone(),
            "last_gradient": backbone.weight.grad.clone(), "buckets_sent": len(sent),
            "ddp": type(state.replica).__name__}


def gather_checks(rank: int) -> dict:
    """all_gather_with_grad of uneven batches and broadcast_object inside a real group."""
    x = torch.full((3 - rank, 2), float(rank + 1), requires_grad=True)
    gathered = distributed.all_gather_with_grad(x)
    upstream = torch.arange(10.0).reshape(5, 2)
    (gathered * upstream).sum().backward()
    return {"gathered": gathered.detach(), "gather_grad": x.grad,
            "broadcast": distributed.broadcast_object(f"run-of-rank-{rank}")}


def spread_evaluation(specimens: str) -> dict:
    """`evaluate(spread=True)` of a random tiny model in this process group: the result (None
    off rank 0), the rows this rank embedded, and how many embeddings it held once they were
    gathered (None: it holds none)."""
    from taxonclip import embed, evaluation

    embedded, held = [], []
    real_dataset, real_visual = embed.embed_dataset, embed.embed_visual

    def recording(*args, **kwargs):
        vectors, kept = real_dataset(*args, **kwargs)
        embedded.extend(kept.tolist())
        return vectors, kept

    def holding(*args, **kwargs):
        vectors, kept = real_visual(*args, **kwargs)
        held.append(None if vectors is None else len(vectors))
        return vectors, kept

    embed.embed_dataset, embed.embed_visual = recording, holding
    result = evaluation.evaluate(spread_config(specimens), create_model("tiny", "none"),
                                 spread=True)
    embed.embed_dataset, embed.embed_visual = real_dataset, real_visual
    return {"table": None if result is None else result.table, "embedded": embedded, "held": held}


def spread_failure(rank: int, specimens: str) -> str:
    """`evaluate(spread=True)` where rank 1 alone cannot read an image of its share: the
    message each rank ends with (a rank waiting for the other in vain would never end)."""
    from taxonclip.data import images
    from taxonclip import evaluation

    real = images.ImageDataset.__getitem__

    def unreadable(self, i):
        if i == 1:
            raise DataError(f"image {self.paths[i]} cannot be read")
        return real(self, i)

    if rank == 1:
        images.ImageDataset.__getitem__ = unreadable
    try:
        evaluation.evaluate(spread_config(specimens), create_model("tiny", "none"), spread=True)
    except DataError as error:
        return str(error)
    finally:
        images.ImageDataset.__getitem__ = real
    return "no error"


def spread_config(specimens: str) -> EvalConfig:
    """Evaluation of the specimens on the CPU, nothing cached."""
    return EvalConfig(data=DataConfig(data=specimens), workers=0, device="cpu",
                      cache_embeddings=False, batch_size=16)


def join_group_of_two(rank: int, port: int) -> distributed.DistInfo:
    """This spawned process as rank `rank` of a 2-process gloo group, as torchrun would start it."""
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return distributed.init_from_env("cpu")


def leave_group_with(results: dict, rank: int, out: str) -> None:
    """Leave the group once both ranks are done, and save this rank's results for the test."""
    distributed.barrier()
    distributed.shutdown()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def worker(rank: int, port: int, out: str, specimens: str) -> None:
    info = join_group_of_two(rank, port)
    results = {"info": info, **gather_checks(rank),
               "full": sharded_step(rank, 1.0, LABELS)}
    torch.manual_seed(rank + 1)
    results["sampled"] = sharded_step(rank, 0.5, SAMPLED_LABELS)
    results["steps"] = {accum: train_steps(rank, 2, accum) for accum in (1, 2)}
    results["evaluation"] = spread_evaluation(specimens)
    results["failure"] = spread_failure(rank, specimens)
    leave_group_with(results, rank, out)


def compiled_worker(rank: int, port: int, out: str) -> None:
    """`train_steps` through torch.compile of the DDP replica, with and without grad_accum."""
    join_group_of_two(rank, port)
    results = {accum: train_steps(rank, 2, accum, compiled=True) for accum in (1, 2)}
    leave_group_with(results, rank, out)


def spawned_results(target, out: Path, *args, timeout_s: float = SPAWN_TIMEOUT_S) -> list[dict]:
    """Both ranks' results of `target(rank, port, out, *args)` in 2 gloo processes."""
    context = mp.spawn(target, args=(free_port(), str(out), *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 gloo processes did not finish within {timeout_s} s")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, specimens) -> list[dict]:
    """Both ranks' results of one run of `worker` in 2 gloo processes."""
    return spawned_results(worker, tmp_path_factory.mktemp("ranks"), str(specimens))


def single_process_step(sample_rate: float, labels: list[int], classes: list[int] | None = None):
    """The same step in one process on the whole batch; `classes` restricts the centres."""
    backbone, inputs, centres = shared_case()
    if classes is not None:
        centres = centres[classes]
        labels = [classes.index(label) for label in labels]
    module = PartialFC(CombinedMarginLoss.from_config(LossConfig(s=S, m2=M2)), EMBEDDING_SIZE, len(centres), sample_rate)
    module.weight.data.copy_(centres)
    loss = module(backbone(inputs), torch.tensor(labels))
    loss.backward()
    return loss.item(), backbone, module


def hand_arcface_loss(classes: list[int], labels: list[int]) -> float:
    """F.cross_entropy of s·cos with s·cos(θ+m2) at the target, over the given classes only."""
    backbone, inputs, centres = shared_case()
    with torch.no_grad():
        cosines = F.normalize(backbone(inputs)) @ F.normalize(centres[classes]).T
        columns = [classes.index(label) for label in labels]
        for row, column in enumerate(columns):
            cosines[row, column] = torch.cos(torch.arccos(cosines[row, column]) + M2)
        return F.cross_entropy(S * cosines, torch.tensor(columns)).item()


def test_group_helpers_in_two_processes(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert (result["info"].rank, result["info"].world_size, result["info"].is_main) == \
            (rank, 2, rank == 0)
        assert result["gathered"].tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 2
        # both ranks' losses use the gathered rows: each row's gradient is twice its upstream
        upstream = torch.arange(10.0).reshape(5, 2)
        rows = slice(0, 3) if rank == 0 else slice(3, 5)
        assert torch.equal(result["gather_grad"], 2 * upstream[rows])
        assert result["broadcast"] == "run-of-rank-0"


def test_sharded_loss_and_gradients_equal_the_single_process_full_softmax(two_ranks):
    """Backbone gradients are compared summed over ranks (DDP averaging would divide by 2)."""
    loss, backbone, module = single_process_step(1.0, LABELS)
    full = [result["full"] for result in two_ranks]
    for result in full:
        assert result["loss"] == pytest.approx(loss, abs=1e-5)
        torch.testing.assert_close(result["full_centres"], shared_case()[2], rtol=0, atol=0)
    torch.testing.assert_close(full[0]["backbone_weight"] + full[1]["backbone_weight"],
                               backbone.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(full[0]["backbone_bias"] + full[1]["backbone_bias"],
                               backbone.bias.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([full[0]["centres"], full[1]["centres"]]),
                               module.weight.grad, rtol=0, atol=1e-5)
    assert loss == pytest.approx(hand_arcface_loss(list(range(NUM_CLASSES)), LABELS), abs=1e-5)


def test_sharded_sampling_keeps_positives_and_softmaxes_over_all_sampled(two_ranks):
    sampled = [result["sampled"] for result in two_ranks]
    classes = sampled[0]["sampled"].tolist() + sampled[1]["sampled"].tolist()
    assert 1 in classes[:2] and 7 in classes[2:] and len(classes) == 4
    assert all(result["loss"] == pytest.approx(sampled[0]["loss"], abs=1e-6) for result in sampled)
    loss, backbone, _ = single_process_step(1.0, SAMPLED_LABELS, classes)
    assert sampled[0]["loss"] == pytest.approx(loss, abs=1e-5)
    assert loss == pytest.approx(hand_arcface_loss(classes, SAMPLED_LABELS), abs=1e-5)
    torch.testing.assert_close(sampled[0]["backbone_weight"] + sampled[1]["backbone_weight"],
                               backbone.weight.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_steps_in_two_processes_equal_one_process_on_the_whole_batch(two_ranks, grad_accum,
                                                                       no_torchrun):
    """The real train_step under DistributedDataParallel (gloo), its gradients summed over
    ranks, against one process on every rank's rows; with grad_accum 2, no_sync sends the
    backbone's gradients once per step instead of once per micro-batch."""
    alone = train_steps(0, 1, grad_accum)
    assert alone["ddp"] == "Linear" and alone["buckets_sent"] == 0
    for result in two_ranks:
        ranked = result["steps"][grad_accum]
        assert ranked["ddp"] == "DistributedDataParallel"
        torch.testing.assert_close(ranked["weight"], alone["weight"], rtol=0, atol=1e-5)
        torch.testing.assert_close(ranked["bias"], alone["bias"], rtol=0, atol=1e-5)
        # AdamW barely notices a constant gradient scale: DDP's mean would pass the weights
        torch.testing.assert_close(ranked["last_gradient"], alone["last_gradient"], rtol=0,
                                   atol=1e-5)
        assert ranked["buckets_sent"] == TRAIN_STEPS  # one bucket a step, whatever grad_accum
    assert not torch.equal(alone["weight"], shared_case()[0].weight)  # the steps moved it


@pytest.mark.slow
def test_compiled_ddp_steps_in_two_processes_equal_one_process_on_the_whole_batch(tmp_path,
                                                                                no_torchrun):
    """compile=true under torchrun: torch.compile of the DDP replica (its graph split at the
    buckets by DDP's optimizer) steps as one uncompiled process does, grad_accum included."""
    alone = {accum: train_steps(0, 1, accum) for accum in (1, 2)}
    for result in spawned_results(compiled_worker, tmp_path, timeout_s=COMPILE_TIMEOUT_S):
        for accum, ranked in result.items():
            assert ranked["ddp"] == "DistributedDataParallel"
            torch.testing.assert_close(ranked["weight"], alone[accum]["weight"], rtol=0, atol=1e-5)
            torch.testing.assert_close(ranked["bias"], alone[accum]["bias"], rtol=0, atol=1e-5)
            assert ranked["buckets_sent"] == TRAIN_STEPS


def test_evaluation_under_torchrun_spreads_the_images_and_scores_on_rank_0(two_ranks, specimens,
                                                                          no_torchrun):
    """Each rank embeds a disjoint share of the images, together all of them once; rank 0
    gathers them all, and its table equals the table of one process embedding everything."""
    from taxonclip.evaluation import evaluate

    shares = [set(result["evaluation"]["embedded"]) for result in two_ranks]
    rows = len(read_manifest(specimens).table)
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(rows))
    assert sum(len(result["evaluation"]["embedded"]) for result in two_ranks) == rows
    assert two_ranks[1]["evaluation"]["table"] is None
    # rank 0 gathers every embedding; rank 1 keeps none of them once its share is sent
    assert [result["evaluation"]["held"] for result in two_ranks] == [[rows], [None]]
    alone = evaluate(spread_config(str(specimens)), create_model("tiny", "none")).table
    pd.testing.assert_frame_equal(two_ranks[0]["evaluation"]["table"], alone, check_exact=False,
                                  atol=1e-6)


def test_an_unreadable_image_on_one_rank_stops_every_rank_with_its_message(two_ranks):
    messages = [result["failure"] for result in two_ranks]
    assert messages[0] == messages[1] and "cannot be read" in messages[0], messages
