"""The reference study's trainer: pipeline stages balanced by parameters."""

from test_plan_cost import workload

from jaxlayouts.plan import cost
from jaxlayouts.plan.study import STUDY, balanced_partition


def test_the_study_trainer_balances_stages_by_parameters():
    # 13B with a 128k vocabulary: embedding and head weigh about two layers each, so the first
    # and last of four stages get two layers fewer; 1F1B keeps 4, 3, 2, 1 micro-batches in flight.
    w = workload(tp=1, pp=4, data_parallel=16, trainer=STUDY)
    assert [(s.layers, s.embedding, s.head, s.in_flight) for s in cost.stages(w)] == [
        (9, True, False, 4), (11, False, False, 3), (11, False, False, 2), (9, False, True, 1)]
    assert [s.layers for s in cost.stages(workload(tp=1, pp=4, data_parallel=16))] == [10] * 4
    assert balanced_partition([5, 1, 1, 1, 5], 2) == [3, 2]
    assert balanced_partition([1, 1, 1], 3) == [1, 1, 1]
