"""ParallelDims and its meshes: validation and the rank groups of each layout.

The layouts are built on 4 real gloo ranks in one spawn; each group is also checked with an
all-reduce over its process group. Training under each layout (HSDP included) is compared with
one process in test_layouts.py.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from torch.distributed.tensor import DTensor, Replicate, Shard

import parallel.mesh
from parallel.fsdp import parallelize_model
from parallel.mesh import ParallelDims
from trainer.config import ConfigError, load_config
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer

# R dp_replicate, S dp_shard, C cp, E ep; a group is written as its ranks, "-" means every rank
# alone. The same table is in parallel/mesh.py's docstring (checked below).
LAYOUTS = """\
    degrees          dp_shard_cp  dp_replicate  cp      dp      ep      dp_shard_mod_ep
    S=4              0123         -             -       0123    -       0123
    S=4 E=2          0123         -             -       0123    01 23   02 13
    S=4 E=4          0123         -             -       0123    0123    -
    S=2 C=2          0123         -             01 23   02 13   -       0123
    S=2 C=2 E=2      0123         -             01 23   02 13   01 23   02 13
    S=2 C=2 E=4      0123         -             01 23   02 13   0123    -
    R=2 S=2          01 23        02 13         -       0123    -       01 23
    R=2 S=2 E=2      01 23        02 13         -       0123    01 23   -
"""
VIEWS = ("dp_shard_cp", "dp_replicate", "cp", "dp", "ep", "dp_shard_mod_ep")


def parse_layouts() -> dict[str, tuple[dict[str, int], dict[str, str]]]:
    """{"S=4 E=2": ({"R": 1, "S": 4, "C": 1, "E": 2}, {"ep": "01 23", ...}), ...}"""
    layouts = {}
    for line in LAYOUTS.splitlines()[1:]:
        name, *cells = re.split(r"\s{2,}", line.strip())  # columns: 2+ spaces apart
        sizes = {"R": 1, "S": 1, "C": 1, "E": 1}
        sizes.update((key, int(value)) for key, value in (d.split("=") for d in name.split()))
        layouts[name] = (sizes, dict(zip(VIEWS, cells, strict=True)))
    return layouts


def describe(groups: set[tuple[int, ...]]) -> str:
    if all(len(group) == 1 for group in groups):
        return "-"
    return " ".join("".join(map(str, group)) for group in sorted(groups))


TINY = ModelConfig(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dense_ffn_dim=64,
    expert_ffn_dim=32, n_experts=4, interleave_moe_layer_step=2,
)  # fmt: skip


def build_every_layout(rank: int, world_size: int, layouts: dict) -> dict:
    """Per layout: this rank's group in each view, checked by an all-reduce of the ranks."""
    out = {}
    for name, (s, _) in layouts.items():
        meshes = ParallelDims(s["R"], s["S"], s["E"], s["C"], world_size).build_mesh("cpu")
        views = {
            "dp_shard_cp": meshes.dp_shard_cp,
            "dp_replicate": meshes.world["dp_replicate"],
            "cp": meshes.world["cp"],
            "dp": meshes.dp,
            "ep": meshes.ep,
            "dp_shard_mod_ep": meshes.experts["dp_shard_mod_ep"],
        }
        groups = {}
        for view, mesh in views.items():
            ranks = tuple(mesh.mesh.tolist())
            total = torch.tensor([rank])
            dist.all_reduce(total, group=mesh.get_group())
            assert total.item() == sum(ranks), (name, view)
            groups[view] = ranks
        out[name] = {
            "groups": groups,
            "world": (meshes.world.mesh_dim_names, tuple(meshes.world.shape)),
            "experts": (meshes.experts.mesh_dim_names, tuple(meshes.experts.shape)),
            "fsdp": meshes.fsdp.mesh_dim_names,
            "expert_fsdp": meshes.expert_fsdp.mesh_dim_names,
            "one_root": meshes.experts._get_root_mesh() is meshes.world
            and meshes.dense._get_root_mesh() is meshes.world,
        }
    # HSDP: the dense parameters are sharded inside a replica and replicated across replicas.
    meshes = ParallelDims(2, -1, 1, 1, world_size).build_mesh("cpu")
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    parallelize_model(model, meshes, torch.float32, checkpoint_every=0)
    weight = model.layers["0"].attention_norm.weight
    assert isinstance(weight, DTensor)
    out["hsdp"] = (weight.device_mesh.mesh_dim_names, weight.placements)
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(build_every_layout, world_size=4, args=(parse_layouts(),))


def test_the_docstring_shows_the_tested_table():
    assert LAYOUTS in parallel.mesh.__doc__


@pytest.mark.parametrize("name", list(parse_layouts()))
def test_rank_groups_of_each_layout(four_ranks, name):
    sizes, expected = parse_layouts()[name]
    for view in VIEWS:
        groups = {per_rank[name]["groups"][view] for per_rank in four_ranks}
        assert describe(groups) == expected[view], (name, view)
    result = four_ranks[0][name]
    r, s, c, e = sizes["R"], sizes["S"], sizes["C"], sizes["E"]
    assert result["world"] == (("dp_replicate", "dp_shard", "cp"), (r, s, c))
    assert result["experts"] == (("dp_replicate", "dp_shard_mod_ep", "ep"), (r, s * c // e, e))
    replicate = ("dp_replicate",) if r > 1 else ()
    assert result["fsdp"] == (*replicate, "dp_shard_cp")
    assert result["expert_fsdp"] == (*replicate, "dp_shard_mod_ep")
    assert result["one_root"]


def test_dp_replicate_gives_hsdp_parameters(four_ranks):
    for per_rank in four_ranks:
        assert per_rank["hsdp"] == (("dp_replicate", "dp_shard_cp"), (Replicate(), Shard(0)))


@pytest.mark.parametrize(
    ("degrees", "message"),
    [
        ((1, 3, 1, 1, 4), r"parallel.dp_replicate \(1\) x parallel.dp_shard \(3\) x parallel.cp "
                          r"\(1\) = 3 must equal the world size 4 \(parallel.ep borrows"),
        ((1, 4, 1, 2, 4), r"= 8 must equal the world size 4"),
        ((3, -1, 1, 1, 4), r"parallel.dp_shard = -1 takes the ranks that parallel.dp_replicate "
                           r"\(3\) x parallel.cp \(1\) = 3 leave, but the world size 4 is not "),
        ((1, -1, 3, 1, 4), r"parallel.ep \(3\) must divide parallel.dp_shard \(4\) x parallel.cp "
                           r"\(1\) = 4: expert parallelism borrows"),
        ((2, -1, 4, 1, 4), r"parallel.ep \(4\) must divide parallel.dp_shard \(2\) x"),
        ((0, -1, 1, 1, 4), r"parallel.dp_replicate must be >= 1; got 0"),
        ((1, 0, 1, 1, 4), r"parallel.dp_shard must be >= 1, or -1 for the rest of the ranks; "),
        ((1, -2, 1, 1, 4), r"parallel.dp_shard must be >= 1, or -1 .* got -2"),
        ((1, -1, 0, 1, 4), r"parallel.ep must be >= 1; got 0"),
        ((1, -1, 1, 0, 4), r"parallel.cp must be >= 1; got 0"),
        ((1, -1, 1, 1, 0), r"the world size must be >= 1; got 0"),
    ],
)  # fmt: skip
def test_invalid_degrees_name_the_config_keys(degrees, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(*degrees)


def test_ep_borrows_from_dp_shard_and_cp_together():
    """ep=4 spans dp_shard=2 x cp=2: valid, and each expert is then FSDP-sharded over 1 rank."""
    dims = ParallelDims(1, 2, 4, 2, 4)
    assert (dims.dp_shard_cp, dims.dp_shard_mod_ep, dims.dp_size) == (4, 1, 2)


def test_degrees_resolve_and_report_what_is_enabled():
    dims = ParallelDims(2, -1, 1, 1, 8)
    assert (dims.dp_shard, dims.dp_size, dims.dp_shard_cp) == (4, 8, 4)
    assert dims.dp_replicate_enabled and dims.dp_shard_enabled and dims.fsdp_enabled
    assert not dims.ep_enabled and not dims.cp_enabled
    dims = ParallelDims(1, -1, 4, 2, 8)
    assert (dims.dp_shard, dims.dp_size, dims.dp_shard_cp, dims.dp_shard_mod_ep) == (4, 4, 8, 2)
    assert dims.ep_enabled and dims.cp_enabled and not dims.dp_replicate_enabled
    one = ParallelDims(1, -1, 1, 1, 1)
    assert one.dp_shard == 1 and not (one.dp_shard_enabled or one.fsdp_enabled)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--parallel.cp=3", r"training.seq_len \(256\) must be divisible by 2 x parallel.cp \(6\)"),
        ("--parallel.ep=3", r"parallel.ep \(3\) must divide model.n_experts \(8\)"),
        ("--parallel.dp_shard=0", "parallel.dp_shard must be >= 1, or -1"),
        ("--parallel.dp_replicate=0", "parallel.dp_replicate must be >= 1; got 0"),
    ],
)  # fmt: skip
def test_config_rejects_what_training_cannot_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
