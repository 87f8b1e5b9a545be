"""Explore's views: which device holds which shard; sizes and MFU for people."""

from jaxlayouts.explore_view import Comparison, Report, placement
from jaxlayouts.units import bytes_text


def test_placement_names_each_shard_and_its_devices():
    entry = {"shape": [8, 6], "shard_shape": [4, 3], "spec_axes": [["fsdp"], ["tp"]]}
    shards = placement(entry, {"dp": 2, "fsdp": 2, "tp": 2, "pp": 1})
    assert shards == [("[0:4, 0:3]", "dp=*, fsdp=0, tp=0"), ("[0:4, 3:6]", "dp=*, fsdp=0, tp=1"),
                      ("[4:8, 0:3]", "dp=*, fsdp=1, tp=0"), ("[4:8, 3:6]", "dp=*, fsdp=1, tp=1")]
    both = {"shape": [8], "shard_shape": [2], "spec_axes": [["fsdp", "tp"]]}  # the first axis is major
    assert [s for s, _ in placement(both, {"dp": 1, "fsdp": 2, "tp": 2, "pp": 1})] == ["[0:2]", "[2:4]", "[4:6]", "[6:8]"]


def test_sizes_read_in_binary_units_and_mfu_as_a_percentage():
    assert [bytes_text(b) for b in (512, 1536, 2**30, 21150 * 2**30, 3 * 2**50, 2**62, None)] == \
        ["512 B", "1.5 KiB", "1 GiB", "20.65 TiB", "3 PiB", "4096 PiB", "n/a"]
    report = Report({"layout": "fsdp=8", "collectives": [{"kind": "all-gather", "axes": ["fsdp"], "bytes": 2**40, "count": 3}],
                     "memory": {"compiled": {"peak": 5 * 2**30}, "analytic": {"total": 6 * 2**30}},
                     "predicted": {"step_time_s": 1.5, "mfu": 0.03512}})
    assert report._collectives() == (["collective", "mesh axes", "size per device", "count per step", "bytes per step"],
                                     [["all-gather", "fsdp", "1 TiB", 3, "3 TiB"]])
    header, rows = Comparison([report])._table()
    assert header == ["layout", "compiled_peak", "analytic_total", "collective[fsdp]", "predicted_step_time_s",
                      "predicted_mfu"]
    assert rows == [["fsdp=8", "5 GiB", "6 GiB", "3 TiB", "1.5", "3.5%"]]
