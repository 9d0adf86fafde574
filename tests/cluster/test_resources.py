"""Resources from the config: custom resources (a node type) and GPUs on clusters that autoscale."""

import pytest

from selma.config import load_config

pytestmark = pytest.mark.slow  # every test here runs on a local Ray


def test_experts_that_cannot_fit_fail_fast_unless_told_how_many_run_at_once(ray_local):
    from selma.train.experts import expert_resources, experts_at_once

    on_gpus = load_config("tiny", ["train.resources.gpus=1"])
    with pytest.raises(RuntimeError, match="needs 1 GPUs.*max_concurrent_experts"):
        experts_at_once(on_gpus)
    # An autoscaler may add GPU nodes later: an explicit number is trusted.
    assert experts_at_once(load_config("tiny", ["train.resources.gpus=1", "train.max_concurrent_experts=3"])) == 3

    pinned = load_config("tiny", ["train.resources.custom={gpu_node: 1}", "train.resources.workers=2",
                                  "train.effective_batch_size=8"])
    assert expert_resources(pinned.train)["gpu_node"] == 2
    with pytest.raises(RuntimeError, match=r"custom resources \{'gpu_node': 2"):
        experts_at_once(pinned)


def test_image_actors_ask_for_the_configured_custom_resources(ray_local):
    import pyarrow as pa
    import ray

    from selma.core.config import ImagesConfig, Resources
    from selma.images.stage import draw_images

    rows = ray.data.from_arrow(pa.table({"prompt": ["a cube"], "seed": [1]}))
    dataset = draw_images(rows, "tiny:sd", ImagesConfig(steps=1), batch_size=1,
                          resources=Resources(cpus=0.5, custom={"gpu_node": 1}))
    options = dataset._logical_plan.dag.ray_remote_args
    assert options["resources"] == {"gpu_node": 1} and options["num_cpus"] == 0.5
