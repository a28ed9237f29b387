import pytest
import torch

from custvid_core.adapters.lora import native_lora_factors
from custvid_core.control import (
    AttentionEdit,
    Controls,
    SamplingControl,
    SamplingStep,
    ScheduledStrengths,
    StrengthSchedule,
    UnmergedLora,
)
from custvid_core.control.sampling import CrossAttentionCall, conditional_rows
from custvid_core.errors import InputError


def test_a_step_is_found_in_its_schedule_by_sigma_and_its_progress_is_the_fraction_of_steps_done():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    steps = [SamplingStep.at_sigma(s, sigmas) for s in (1.0, 0.75, 0.5, 0.25)]
    assert [s.index for s in steps] == [0, 1, 2, 3] and [s.progress for s in steps] == [0.0, 0.25, 0.5, 0.75]
    assert steps[2] == SamplingStep.of(2, sigmas) == SamplingStep(2, 4, 0.5, 0.25)
    assert SamplingStep.at_sigma(0.7, sigmas).index == 1  # the nearest level
    alone = SamplingStep.at_sigma(0.3, None)  # outside a sampler: the one step from sigma to 0
    assert (alone.index, alone.count, alone.sigma_next, alone.progress) == (0, 1, 0.0, 0.0)


def test_conditional_rows_of_a_chunked_batch():
    assert conditional_rows([0, 1], 4) == (0, 1)
    assert conditional_rows([1, 0], 4) == (2, 3)
    assert conditional_rows([0], 3) == (0, 1, 2)
    assert conditional_rows([1], 2) == ()


def test_scheduled_strengths_set_an_unmerged_lora_and_it_adds_the_scaled_product():
    down, up = torch.randn(2, 3), torch.randn(4, 2)
    tensors = {"diffusion_model.blocks.0.ffn.0.lora_down.weight": down,
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": up,
               "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(1.0)}
    lora = UnmergedLora(tensors)
    control = ScheduledStrengths(lora, {"lora": StrengthSchedule(((0.0, 0.0), (0.5, 2.0)))})
    apply = lora.weight_function("diffusion_model.blocks.0.ffn.0")
    w = torch.randn(4, 3)
    sigmas = torch.linspace(1, 0, 11)
    control.before_step(SamplingStep.of(4, sigmas))
    assert torch.equal(apply(w), w)
    control.before_step(SamplingStep.of(6, sigmas))
    assert torch.allclose(apply(w), w + 2.0 * 0.5 * up @ down)  # alpha / rank = 0.5
    with pytest.raises(InputError, match="lora"):
        UnmergedLora({"blocks.0.q.weight": torch.zeros(1)})
    with pytest.raises(InputError, match="adapter"):
        ScheduledStrengths(lora, {"subject": StrengthSchedule()}).before_step(SamplingStep.of(0, sigmas))


def test_native_lora_factors_read_the_scale_and_refuse_a_missing_up_factor():
    down, up = torch.randn(4, 3), torch.randn(5, 4)
    factors = native_lora_factors({"diffusion_model.blocks.1.ffn.2.lora_down.weight": down,
                                   "diffusion_model.blocks.1.ffn.2.lora_up.weight": up})
    assert list(factors) == ["blocks.1.ffn.2"] and factors["blocks.1.ffn.2"][2] == 1.0  # no alpha: alpha = rank
    with pytest.raises(InputError, match="lora_up.weight' is missing"):
        native_lora_factors({"diffusion_model.blocks.1.ffn.2.lora_down.weight": down})


def test_controls_run_in_order_and_two_edits_of_one_row_are_refused():
    class Add(SamplingControl):
        def __init__(self, value, rows=()):
            self.value, self.rows = value, rows

        def after_step(self, step, x):
            return x * 10 + self.value

        def attention_edit(self, step, call):
            return {row: AttentionEdit(keep=torch.tensor([0])) for row in self.rows}

    step, call = SamplingStep(0, 1, 1.0, 0.0, (0, 1)), CrossAttentionCall(0, (1, 1, 1), 4)
    assert not Controls([SamplingControl()]).edits_attention
    assert Controls([Add(1), Add(2)]).after_step(step, torch.zeros(())) == 12
    assert set(Controls([Add(1, (0,)), Add(2, (1,))]).attention_edit(step, call)) == {0, 1}
    with pytest.raises(InputError, match="row 1"):
        Controls([Add(1, (0, 1)), Add(2, (1,))]).attention_edit(step, call)


@pytest.mark.parametrize("text", ["0.5:1, 0:2", "a", "0:1:2", "1.2:1"])
def test_bad_schedules_are_refused(text):
    with pytest.raises(InputError, match="strength schedule"):
        StrengthSchedule.parse(text)
