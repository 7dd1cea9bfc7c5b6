"""The K x R layout of ranks, without processes (``tests/runtime/test_replicas.py`` pins the
2 x 2 mesh, a plain shard and one world-size message; this covers the rest): the numbering
rank = r K + k everywhere, the degenerate meshes, tuples and dtypes in shards, and every
fix a wrong world size is told."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ddgpipe.errors import UsageError
from ddgpipe.runtime.layout import Layout, check_world, process_layout


@pytest.mark.parametrize("stages,replicas", [(3, 2), (2, 4), (4, 1), (1, 3)])
def test_rank_is_replica_times_stages_plus_stage(stages, replicas):
    seen = set()
    for r in range(replicas):
        for k in range(stages):
            rank = r * stages + k
            layout = Layout.grid(stages, replicas, rank)
            assert (layout.replica, layout.stage) == (r, k)
            assert layout.rank_of(k) == rank and layout.rank_of(k, r) == rank
            assert layout.world == stages * replicas
            assert layout.prev_rank == (rank - 1 if k > 0 else None)
            assert layout.next_rank == (rank + 1 if k < stages - 1 else None)
            assert layout.data_ranks == [q * stages + k for q in range(replicas)]
            assert layout.last_rank == stages * replicas - 1
            assert layout.writes_stage_state == (r == 0)
            assert layout.data_group is None  # no processes, no mesh
            seen.add((layout.replica, layout.stage))
    assert len(seen) == stages * replicas


def test_rank_of_reaches_into_another_replica():
    layout = Layout.grid(3, 2, 1)
    assert [layout.rank_of(k, 1) for k in range(3)] == [3, 4, 5]
    assert [layout.rank_of(k) for k in range(3)] == [0, 1, 2]


def test_one_stage_has_no_neighbours_and_one_replica_no_peers():
    alone = Layout.grid(1, 1, 0)
    assert (alone.prev_rank, alone.next_rank, alone.data_ranks, alone.last_rank) == \
        (None, None, [0], 0)
    chain = Layout.grid(4, 1, 2)
    assert (chain.prev_rank, chain.next_rank, chain.data_ranks) == (1, 3, [2])


def test_describe_names_rank_stage_and_replica():
    assert Layout.grid(3, 2, 4).describe() == "rank 4 (stage 1 of replica 1)"


def test_a_mesh_of_the_wrong_shape_or_without_the_rank_is_refused():
    with pytest.raises(ValueError, match="a 2 x 2 layout needs that many ranks"):
        Layout(2, 2, 0, ((0, 1), (2,)))
    with pytest.raises(ValueError, match="a 2 x 2 layout needs that many ranks"):
        Layout(2, 2, 0, ((0, 1),))
    outside = Layout(2, 1, 7, ((0, 1),))
    with pytest.raises(ValueError, match=r"rank 7 is not in the mesh \(\(0, 1\),\)"):
        _ = outside.stage


def test_an_explicit_mesh_is_read_as_given():
    """The ranks come from the DeviceMesh, whatever their order: ask the layout, never
    compute ranks."""
    layout = Layout(2, 2, 1, ((3, 2), (1, 0)))
    assert (layout.replica, layout.stage, layout.prev_rank, layout.next_rank) == (1, 0, None, 0)
    assert layout.data_ranks == [3, 1] and layout.last_rank == 0
    assert not layout.writes_stage_state


def test_a_tuple_is_sharded_row_by_row_keeping_dtypes():
    x = torch.arange(24, dtype=torch.float64).reshape(6, 4)
    ids = torch.arange(6)
    mask = torch.tensor([True, False, True, True, False, False])
    shards = [Layout.grid(2, 3, r * 2 + 1).shard((x, ids, mask)) for r in range(3)]
    for r, shard in enumerate(shards):
        assert isinstance(shard, tuple) and len(shard) == 3
        assert torch.equal(shard[0], x[2 * r: 2 * r + 2])
        assert torch.equal(shard[1], ids[2 * r: 2 * r + 2])
        assert torch.equal(shard[2], mask[2 * r: 2 * r + 2])
        assert [t.dtype for t in shard] == [torch.float64, torch.int64, torch.bool]
    assert torch.equal(torch.cat([s[0] for s in shards]), x)


def test_one_replica_takes_the_batch_as_it_is_even_when_odd():
    batch = (torch.randn(7, 2), torch.arange(7))
    assert Layout.grid(3, 1, 1).shard(batch) is batch


def test_an_indivisible_batch_is_refused_naming_the_fix():
    layout = Layout.grid(2, 4, 5)
    with pytest.raises(UsageError, match=r"a minibatch of 10 samples cannot be split into 4 "
                                         r"equal shards \(one per replica\); pass a batch size "
                                         r"that is a multiple of 4"):
        layout.shard((torch.randn(10, 3), torch.arange(10)))


def test_a_world_of_stages_times_replicas_passes():
    for world, stages, replicas in [(1, 1, 1), (3, 3, 1), (6, 3, 2), (8, 2, 4)]:
        assert check_world(world, stages, replicas) is None  # no error
        with pytest.raises(UsageError, match=f"{world + 1} processes but {stages} stages"):
            check_world(world + 1, stages, replicas)  # and one process more is refused


def test_fewer_than_one_replica_is_refused():
    with pytest.raises(UsageError, match=r"replicas must be >= 1 \(got 0\)"):
        check_world(0, 2, 0)


def test_one_replica_is_told_how_many_processes_to_launch_or_which_stages():
    with pytest.raises(UsageError, match=r"^4 processes but 3 stages: the runtime runs one "
                                         r"stage per process; launch 3 processes \(torchrun "
                                         r"--nproc-per-node 3\) or pass --stages 4$"):
        check_world(4, 3, 1)


@pytest.mark.parametrize("world,stages,replicas,offered,not_offered", [
    (5, 2, 2, [], ["--stages", "--replicas"]),           # neither divides: only the launch
    (4, 3, 2, ["--stages 2"], ["--replicas"]),           # 4 = 2 stages x 2 replicas
    (9, 3, 2, ["--replicas 3"], ["--stages"]),           # 9 = 3 stages x 3 replicas
])
def test_replicas_are_offered_only_the_fixes_that_fit(world, stages, replicas, offered,
                                                      not_offered):
    with pytest.raises(UsageError) as caught:
        check_world(world, stages, replicas)
    message = str(caught.value)
    product = stages * replicas
    assert message.startswith(f"{world} processes but {stages} stages x {replicas} replicas = "
                              f"{product}: ")
    assert f"launch {product} processes (torchrun: nnodes x nproc-per-node = {product})" \
        in message
    for fix in offered:
        assert f"pass {fix}" in message
    for fix in not_offered:
        assert fix not in message


def test_process_layout_of_one_pipeline_needs_no_mesh(tmp_path):
    """R = 1 in a real (one-rank) process group: the plain grid, no mesh, no data group; a
    world that is not K x R is refused before any collective."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        layout = process_layout(1, 1)
        assert layout == Layout.grid(1, 1, 0) and layout.mesh is None
        assert layout.data_group is None
        with pytest.raises(UsageError, match="1 processes but 2 stages"):
            process_layout(2, 1)
    finally:
        dist.destroy_process_group()
