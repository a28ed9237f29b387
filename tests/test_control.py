import pytest
import torch

from custvid_core.control import ScheduledLora, StrengthSchedule, step_fraction
from custvid_core.errors import InputError


def test_step_fraction_finds_the_step_in_the_schedule_or_falls_back_to_sigma():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    assert [step_fraction(s, sigmas) for s in (1.0, 0.8, 0.5, 0.2)] == [0.0, 0.25, 0.5, 0.75]
    assert step_fraction(0.3) == pytest.approx(0.7)


def test_scheduled_lora_adds_the_scaled_product_at_the_current_strength():
    down, up = torch.randn(2, 3), torch.randn(4, 2)
    tensors = {"diffusion_model.blocks.0.ffn.0.lora_down.weight": down,
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": up,
               "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(1.0)}
    lora = ScheduledLora(tensors, StrengthSchedule(((0.0, 0.0), (0.5, 2.0))))
    apply = lora.weight_function("diffusion_model.blocks.0.ffn.0")
    w = torch.randn(4, 3)
    assert torch.equal(apply(w), w)
    lora.set_progress(0.6)
    assert torch.allclose(apply(w), w + 2.0 * 0.5 * up @ down)  # alpha / rank = 0.5
    with pytest.raises(InputError, match="lora"):
        ScheduledLora({"blocks.0.q.weight": torch.zeros(1)}, StrengthSchedule())


@pytest.mark.parametrize("text", ["0.5:1, 0:2", "a", "0:1:2", "1.2:1"])
def test_bad_schedules_are_refused(text):
    with pytest.raises(InputError, match="strength schedule"):
        StrengthSchedule.parse(text)
