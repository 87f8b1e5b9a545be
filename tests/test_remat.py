"""Remat policies: XLA's memory analysis orders them by the activations they keep."""

from conftest import make_run


def test_remat_policies_order_activation_memory(devices):
    """XLA's compiled memory analysis: no recomputation > selective > full recomputation, on a
    shape where saved activations (not logits) set the peak."""
    import dataclasses

    from jaxlayouts.layout import REMAT_CHOICES, load_model_config
    from jaxlayouts.mesh import build_mesh
    from jaxlayouts.remat import POLICIES
    from jaxlayouts.train import Trainer

    assert set(POLICIES) == set(REMAT_CHOICES)
    model = dataclasses.replace(load_model_config("tiny"), num_layers=8, d_ff=1024, vocab_size=64)
    temp = {}
    for remat in ("none", "selective", "save_all_but_ffn", "full"):
        run = dataclasses.replace(make_run("dp=1", seq_len=64, global_batch=16, remat=remat), model=model)
        compiled = Trainer(run, build_mesh(run.layout, devices[:1])).lower().compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["none"] > temp["save_all_but_ffn"] > temp["selective"] > temp["full"]
    assert temp["none"] > 1.3 * temp["full"]
