"""The benchmark's columns from the product's metrics with the world's encoders: the case's ground truth scores better
than another subject on another path."""

from custvid_core.world.bench.customization import (
    ENCODER_METRICS,
    METRICS,
    encoder_measures,
    encoder_targets,
    subject_references,
)
from custvid_core.world.cases import DEFAULT_CASES, load_cases
from custvid_core.world.scene import Scene, render


def test_encoder_metrics_rank_the_ground_truth_above_another_clip():
    case = load_cases(DEFAULT_CASES)[0]
    subject, motion = case.subject_scene(), case.motion_scene()
    truth = render(Scene(colour=subject.colour, shape=subject.shape, texture=subject.texture,
                         object_size=subject.object_size, path=motion.path, path_params=motion.path_params,
                         start=motion.start), case.spec)
    other = render(Scene(colour="green", shape="square", direction="left", start=(26, 10), speed=2.0), case.spec)
    targets = encoder_targets(case, subject_references(case))
    good, bad = encoder_measures(truth.frames, targets), encoder_measures(other.frames, targets)
    assert set(good) == set(ENCODER_METRICS) and set(ENCODER_METRICS) <= set(METRICS)
    assert good["dino_i"] > bad["dino_i"] + 0.1
    # The world's RAFT sees the circle's 10-pixel steps about a pixel short on each axis (2.3 pixels of error; 0 with
    # the exact flow), the other clip's subject never in the path's boxes.
    assert good["box_flow_error"] < bad["box_flow_error"] / 2
    assert good["dynamic_degree_deviation"] < bad["dynamic_degree_deviation"]
