"""The HLO reader: collectives' replica groups, in each spelling XLA prints, map to mesh axes."""

import pytest

from jaxlayouts.analysis import hlo


@pytest.mark.parametrize("groups, axes", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", ("tp",)),
    ("replica_groups=[2,4]<=[8]", ("tp",)),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", ("dp",)),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", ("dp",)),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}", ("tp",)),
    ("replica_groups={{0,1,2,3,4,5,6,7}}", ("dp", "tp")),
])
def test_replica_group_spellings(groups, axes):
    text = f"ENTRY %main {{\n  %x = f32[8,2]{{1,0}} parameter(0)\n  ROOT %a = f32[8,2]{{1,0}} all-gather(%x), {groups}, dimensions={{0}}\n}}"
    (found,) = hlo.collectives(text, {"dp": 2, "fsdp": 1, "tp": 4, "pp": 1})
    assert found.axes == axes and found.bytes == 64


def test_an_async_combined_collective_counts_its_results_not_its_operands():
    """XLA:GPU's start op holds ``((operands), (results))``; the -done op's shape is the result."""
    text = """ENTRY %main {
  %x = bf16[4]{0} parameter(0)
  %y = bf16[8]{0} parameter(1)
  %s = ((bf16[4]{0}, bf16[8]{0}), (bf16[16]{0}, bf16[32]{0})) all-gather-start(%x, %y), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %d = (bf16[16]{0}, bf16[32]{0}) all-gather-done(%s)
}"""
    (found,) = hlo.collectives(text, {"dp": 2, "fsdp": 1, "tp": 4, "pp": 1})
    assert found.kind == "all-gather" and found.axes == ("tp",) and found.bytes == (16 + 32) * 2
