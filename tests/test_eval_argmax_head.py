"""The bf16-screened argmax returns exactly the fp32 argmax, including differences bf16 cannot see."""
from __future__ import annotations

import pytest
import torch

from src.evaluation.argmax_head import ScreenedArgmax
from tests.tiny_model import make_tiny_model


def test_matches_fp32_argmax_on_random_rows():
    torch.manual_seed(0)
    weight = torch.randn(5000, 64) * 0.05
    head = ScreenedArgmax(weight)
    hidden = torch.randn(16, 64) * 4
    assert head(hidden) == (hidden @ weight.T).argmax(-1).tolist()


def test_rows_given_their_candidates_take_the_argmax_among_them():
    torch.manual_seed(2)
    weight = torch.randn(3000, 64) * 0.05
    hidden = torch.randn(3, 64) * 4
    weight[5] = hidden[1] / hidden[1].norm()  # row 1's overall argmax, not a candidate
    logits = hidden @ weight.T
    ids = torch.arange(100, 3000, 7).numpy()
    picks = ScreenedArgmax(weight)(hidden, among=[None, ids, None])
    assert picks[1] == int(ids[int(logits[1, ids].argmax())]) != int(logits[1].argmax())
    assert [picks[0], picks[2]] == logits[[0, 2]].argmax(-1).tolist()


def test_a_margin_below_bf16_resolution_is_still_decided_in_fp32():
    torch.manual_seed(1)
    weight = torch.randn(1000, 64) * 0.05
    hidden = torch.randn(1, 64) * 4
    best = int((hidden @ weight.T).argmax())
    direction = hidden[0] / hidden[0].norm() ** 2
    weight[7] = weight[best] + 1e-4 * direction     # logit 1e-4 above the best: the same number in bf16
    weight[3] = weight[best] - 1e-4 * direction     # 1e-4 below
    exact = (hidden @ weight.T)[0]
    assert exact[7] > exact[best] > exact[3]
    assert torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16())[0, [3, best, 7]].unique().numel() == 1
    assert ScreenedArgmax(weight)(hidden) == [7]


def test_ties_go_to_the_lowest_id_like_torch_argmax():
    weight = torch.zeros(10, 4)
    weight[[2, 6], 0] = 1.0
    assert ScreenedArgmax(weight)(torch.tensor([[1.0, 0, 0, 0]])) == [2]


def test_only_a_plain_fp32_linear_head_is_screened():
    model = make_tiny_model(400)
    assert isinstance(ScreenedArgmax.for_model(model), ScreenedArgmax)
    model.set_output_embeddings(torch.nn.Linear(64, 400, bias=True))
    assert ScreenedArgmax.for_model(model) is None
    assert ScreenedArgmax.for_model(make_tiny_model(400).to(torch.bfloat16)) is None


@pytest.mark.parametrize("rows", [1, 5])
def test_tiny_model_hidden_states(rows):
    model = make_tiny_model(400)
    hidden = torch.randn(rows, 64)
    logits = model.lm_head(hidden)
    assert ScreenedArgmax.for_model(model)(hidden) == logits.argmax(-1).tolist()
