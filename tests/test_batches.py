"""sgan/batches.py: the (seed, step, rank) batches that exact resume and DDP sharding rest on."""
import pytest
import torch

from sgan.batches import IndexStream, StepBatches, derived_seed, shard, steps_per_epoch


def test_processes_take_disjoint_slices_of_one_global_batch():
    one = StepBatches(1000, 40, seed=3, name="unlabeled")
    shards = [StepBatches(1000, 10, seed=3, name="unlabeled", rank=r, world_size=4) for r in range(4)]
    for step in (0, 1, 24, 25, 57):  # 25 steps of 40 make a pass: a pass boundary and a second pass
        parts = [s.indices(step) for s in shards]
        assert torch.equal(torch.cat(parts), one.indices(step))  # rank r holds the r-th slice
        assert len(set(torch.cat(parts).tolist())) == 40  # no image on two processes


def test_an_epoch_covers_every_image_once_then_reshuffles():
    batches = StepBatches(100, 20, seed=0, name="unlabeled")
    first = torch.cat([batches.indices(step) for step in range(5)])
    second = torch.cat([batches.indices(step) for step in range(5, 10)])
    assert sorted(first.tolist()) == list(range(100)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_a_batch_is_a_function_of_seed_name_and_step_only():
    fresh = StepBatches(1000, 32, seed=7, name="labeled")
    walked = StepBatches(1000, 32, seed=7, name="labeled")
    for step in range(40):  # a resumed run's stream equals one that walked there
        walked.indices(step)
    assert torch.equal(fresh.indices(40), walked.indices(40))
    assert not torch.equal(StepBatches(1000, 32, seed=8, name="labeled").indices(40), fresh.indices(40))
    assert not torch.equal(StepBatches(1000, 32, seed=7, name="matching").indices(40), fresh.indices(40))


def test_batches_wrap_across_passes_when_the_size_is_not_a_multiple():
    stream = IndexStream(7, seed=1, name="x")
    taken = stream.take(5, 4)  # the last 2 of pass 0, the first 2 of pass 1
    assert torch.equal(taken[:2], stream.take(5, 2)) and torch.equal(taken[2:], stream.take(7, 2))
    assert len(set(stream.take(0, 7).tolist())) == 7


def test_batches_come_on_the_requested_device():
    assert StepBatches(50, 5, 0, "x", device="meta").indices(3).device.type == "meta"


def test_steps_per_epoch_and_errors():
    assert steps_per_epoch(60000, 100, 2) == 300
    with pytest.raises(ValueError, match="larger than the 50 training images: lower --batch-size to 25 or less"):
        steps_per_epoch(50, 40, 2)
    with pytest.raises(ValueError, match="larger than the 1 training images: add images"):
        steps_per_epoch(1, 4, 2)  # lowering --batch-size cannot help
    with pytest.raises(ValueError, match="empty set"):
        IndexStream(0, 0, "labeled")


def test_evaluation_shards_count_every_item_once():
    parts = [list(shard(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


def test_derived_seeds_are_stable():
    assert derived_seed(0, "step", 5, 1) == derived_seed(0, "step", 5, 1) != derived_seed(0, "step", 5, 0)
    assert derived_seed(1, "x") == 6120993593617680460  # pinned: a change would alter every resumed run
