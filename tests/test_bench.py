"""The benchmark command: case files, measurements with known answers, result tables."""

import json
from pathlib import Path

import pytest
import torch

from custvid_core.errors import InputError
from custvid_core.world.bench.customization import METHODS, measure, run_bench, subject_references
from custvid_core.world.bench.methods import dualreal_methods, lora_methods, method_names, synmotion_methods
from custvid_core.world.cases import DEFAULT_CASES, load_cases
from custvid_core.world.model import DEFAULT_CONFIG, build_world
from custvid_core.world.scene import SEEN_COLOURS, SEEN_SHAPES, Scene, render


def test_default_cases_load_and_render():
    cases = load_cases(DEFAULT_CASES)
    assert len(cases) >= 4
    for case in cases:
        images = case.subject_images()
        assert 3 <= len(images) <= 5 and all(i.masks.sum() > 20 for i in images)
        clips = case.motion_clips()
        assert 2 <= len(clips) <= 3
        # Motion clips show other subjects along the case's path, shifted but the same shape.
        assert all(c.scene.colour != case.subject["colour"] or c.scene.shape != case.subject["shape"] for c in clips)
        ref = case.reference_path()
        for c in clips:
            path = c.centres / case.spec.size
            assert torch.allclose(path - path.mean(0), ref - ref.mean(0), atol=1e-4)
            assert c.masks.sum((1, 2)).min() > 10  # in frame throughout


def test_measure_gives_full_marks_to_the_ground_truth():
    case = load_cases(DEFAULT_CASES)[0]
    subject, motion = case.subject_scene(), case.motion_scene()
    truth = render(Scene(colour=subject.colour, shape=subject.shape, texture=subject.texture,
                         object_size=subject.object_size, path=motion.path, path_params=motion.path_params,
                         start=motion.start), case.spec)
    m = measure(case, truth.frames, subject_references(case))
    assert m["colour_match"] == 1 and m["shape_match"] == 1 and m["shape_iou"] > 0.8
    assert m["path_shape_error"] < 0.03 and m["direction_cosine"] > 0.95 and m["present"] == 1
    other = render(Scene(colour="green", shape="square", direction="left", start=(26, 10), speed=2.0), case.spec)
    worse = measure(case, other.frames, subject_references(case))
    assert worse["colour_match"] == 0 and worse["shape_match"] == 0 and worse["path_shape_error"] > 0.1
    assert m["clip_colour_leak"] == 0 and worse["clip_colour_leak"] == 1  # green: the first motion clip's subject


def test_transfer_cases_keep_the_default_motions_with_a_subject_no_clip_shows():
    defaults, transfer = load_cases(DEFAULT_CASES), load_cases(DEFAULT_CASES.with_name("transfer.json"))
    assert len(transfer) == len(defaults)
    for case, default in zip(transfer, defaults):
        assert case.motion == default.motion and case.seed == default.seed  # the same clips
        clip_colours, clip_shapes = {c for c, _, _ in case.motion_subjects()}, {s for _, s, _ in case.motion_subjects()}
        assert case.subject["colour"] in SEEN_COLOURS and case.subject["colour"] not in clip_colours
        assert case.subject["shape"] in SEEN_SHAPES and case.subject["shape"] not in clip_shapes
        assert case.subject["words"] == case.subject_scene().prompt().removesuffix(" moving right")  # as pretrained on


def test_bench_writes_tables_for_any_case_file(tmp_path):
    case_file = tmp_path / "one.json"
    data = json.loads(DEFAULT_CASES.read_text())
    data["cases"] = data["cases"][:1]
    case_file.write_text(json.dumps(data))
    world = build_world({**DEFAULT_CONFIG, "num_layers": 1, "ffn_dim": 64})
    forwards = []
    world.backbone.model.register_forward_hook(lambda *_: forwards.append(1))
    summary = run_bench(case_file, tmp_path / "out", ["base"], [0, 1], world=world, log=lambda *_: None,
                        sampling_steps=2)
    assert len(forwards) == 2 * 2  # the steps asked for, for each seed (CFG's two passes run as one batch)
    assert set(summary["base"]) == {"orange_star_circle", "average"}
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0]["prompt"] == "orange star"
    assert (tmp_path / "out" / "results.csv").read_text().startswith("case,method,seed,prompt")
    assert "| base | **average** |" in (tmp_path / "out" / "results.md").read_text()


def test_bench_runs_a_dualreal_method(tmp_path, monkeypatch):
    case_file = tmp_path / "one.json"
    data = json.loads(DEFAULT_CASES.read_text())
    data["cases"] = data["cases"][:1]
    case_file.write_text(json.dumps(data))
    world = build_world({**DEFAULT_CONFIG, "num_layers": 1, "ffn_dim": 64})
    monkeypatch.setitem(METHODS, "dualreal", lambda: dualreal_methods(steps=2)["dualreal"])  # 11 training steps
    summary = run_bench(case_file, tmp_path / "out", ["dualreal"], [0], world=world, log=lambda *_: None,
                        sampling_steps=2)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["prompt"] == "sks mtn" and rows[0]["method"] == "dualreal"
    assert set(summary["dualreal"]) == {"orange_star_circle", "average"}
    assert (tmp_path / "out" / "work" / "orange_star_circle" / "dualreal" / "diagnostics.json").exists()


@pytest.mark.parametrize("content, match", [
    ("{", "--cases: 'c.json' is not valid JSON"),
    ('{"cases": []}', "holds no cases"),
    ('{"cases": [{"name": "x", "subject": {"colour": "red", "shape": "circle"}, "motion": {}}]}',
     r"cases\[0\].prompts: is missing"),
    ('{"cases": [{"name": "x", "subject": {"colour": "red", "shape": "circle", "size": 3}, "motion": {}, "prompts": []}]}',
     r"cases\[0\].subject.size: is not a known field"),
    ('{"cases": [{"name": "x", "subject": {"colour": "teal", "shape": "circle"}, "motion": {}, "prompts": []}]}',
     "colour: 'teal' is not in the shapes world"),
])
def test_bad_case_files_name_the_field(tmp_path, content, match):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        load_cases(path)


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(InputError, match="--methods: 'lora' is not a method"):
        run_bench(DEFAULT_CASES, tmp_path, ["lora"], [0], world=build_world({**DEFAULT_CONFIG, "num_layers": 1}))


def test_control_bench_measures_the_chosen_parts_with_the_chosen_camera_window(tmp_path):
    from custvid_core.cli import main

    assert main(["bench-control", "--out", str(tmp_path), "--parts", "camera", "--prompts", "1", "--seeds", "0",
                 "--steps", "2", "--camera-window", "0.5,1"]) == 0
    result = json.loads((tmp_path / "control.json").read_text())
    assert result["settings"]["window"] == [0.5, 1.0]
    assert len(result["camera"]) == 8 and result["boxes"] == []
    # Every pan is judged against the same unshifted clips, whose own pan is measured once.
    assert len({r["own_pan_px"] for r in result["camera"]}) == 1
    assert all(r["added_pan_error"] >= 0 for r in result["camera"])
    assert "camera pan" in (tmp_path / "control.md").read_text()


@pytest.mark.parametrize("option, value, named", [("--parts", "camera,colour", "parts"),
                                                  ("--camera-window", "0.6,0.2", "camera-window"),
                                                  ("--camera-window", "half", "camera-window"),
                                                  ("--perf-pairs", "1", "perf-pairs")])
def test_control_bench_refuses_bad_options_with_the_option_named(tmp_path, capsys, option, value, named):
    from custvid_core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench-control", "--out", str(tmp_path), option, value])
    assert exit_.value.code == 2 and f"error: {named}:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


RECORDED_METHODS = json.loads((Path(__file__).parent / "data" / "lora_methods_before.json").read_text())


def _as_recorded(text: str) -> str:
    """A repr without the fields added after the recording at their defaults: the optimiser's (`loop.LATER_SETTINGS`, previews),
    the recipes' memory savings, the noise levels' range and the method's prompt subject (`subject_words`)."""
    from custvid_core.backbones.memory import MemorySettings
    from custvid_core.training.loop import LATER_SETTINGS, OptimSettings
    from custvid_core.training.objectives import SigmaSampler

    for name in (*LATER_SETTINGS, "preview_every"):
        text = text.replace(f", {name}={getattr(OptimSettings(), name)!r}", "")
    sigmas = SigmaSampler()
    text = text.replace(f", low={sigmas.low!r}, high={sigmas.high!r})", ")")
    return text.replace(f", memory={MemorySettings()!r}", "").replace(", subject_words='clip'", "")


@pytest.mark.parametrize("ladder", sorted(RECORDED_METHODS))
def test_the_methods_file_gives_the_settings_the_ladder_had_in_code(ladder):
    """`methods.toml` read for a ladder (steps, lr, alignment block) gives every method's settings exactly as the
    `replace()` chains they replaced did (their reprs recorded from that code, every field of every setting)."""
    methods = lora_methods(*json.loads(ladder))
    recorded = RECORDED_METHODS[ladder]
    assert list(methods)[:len(recorded)] == list(recorded)  # the same names, in the ladder's order; new ones after
    for name in recorded:
        assert _as_recorded(repr(methods[name])) == recorded[name], name
    # Each method loads its own encoders (prepare fills them in): no dict shared with the method it starts from.
    assert len({id(m.encoders) for m in methods.values()}) == len(methods)


def test_bench_offers_base_and_every_method_of_the_file():
    kinds = [lora_methods(), dualreal_methods(), synmotion_methods()]
    assert list(METHODS) == ["base", *method_names()]  # in the file's order
    assert sorted(METHODS) == sorted(["base", *(name for kind in kinds for name in kind)])
    assert sum(map(len, kinds)) == len(method_names())  # each method of one kind
    assert type(METHODS["dualreal"]()).__name__ == "DualRealMethod" and METHODS["full_moving"]().name == "full_moving"
