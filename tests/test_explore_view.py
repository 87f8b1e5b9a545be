"""Explore's views: which device holds which shard."""

from jaxlayouts.explore_view import placement


def test_placement_names_each_shard_and_its_devices():
    entry = {"shape": [8, 6], "shard_shape": [4, 3], "spec_axes": [["fsdp"], ["tp"]]}
    shards = placement(entry, {"dp": 2, "fsdp": 2, "tp": 2, "pp": 1})
    assert shards == [("[0:4, 0:3]", "dp=*, fsdp=0, tp=0"), ("[0:4, 3:6]", "dp=*, fsdp=0, tp=1"),
                      ("[4:8, 0:3]", "dp=*, fsdp=1, tp=0"), ("[4:8, 3:6]", "dp=*, fsdp=1, tp=1")]
    both = {"shape": [8], "shard_shape": [2], "spec_axes": [["fsdp", "tp"]]}  # the first axis is major
    assert [s for s, _ in placement(both, {"dp": 1, "fsdp": 2, "tp": 2, "pp": 1})] == ["[0:2]", "[2:4]", "[4:6]", "[6:8]"]
