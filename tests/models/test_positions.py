"""Position layouts: the one choice that differs between GLM generations, asked of the model, never branched on."""

import pytest
import torch

from glmkit.models.positions import CAUSAL, LAYOUTS, PREFIX_LM_1D, PREFIX_LM_2D, SpecialIds, padded_layout

from tiny import GMASK, MASK, PAD, SOP, random_model, tiny_config, tiny_glm130b_config

SPECIAL = SpecialIds(bos=SOP, mask=MASK, gmask=GMASK, pad=PAD)


def test_the_model_asks_its_config_for_its_layout():
    assert random_model(tiny_config()).position_layout is PREFIX_LM_2D
    assert random_model(tiny_glm130b_config()).position_layout is PREFIX_LM_1D
    assert set(LAYOUTS) == {"2d-prefix-lm", "1d-prefix-lm", "causal"}


def test_causal_counts_positions_and_hides_the_future_without_any_special_token():
    positions, blocked = CAUSAL.sequence([11, 12, 13, 14], SPECIAL, prefer_gmask=False)
    assert positions.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(blocked, torch.ones(4, 4).triu(1).bool())
    assert CAUSAL.step([11, 12], SPECIAL) == [1]


def test_causal_left_padding_keeps_real_tokens_counting_from_zero():
    batch = padded_layout([[11, 12, 13], [21]], SPECIAL, layout=CAUSAL)
    assert batch["position_ids"].tolist() == [[[0, 1, 2]], [[0, 0, 0]]]
    assert batch["attention_mask"][1, 0, 2].tolist() == [True, True, False]  # the real token sees only itself


def test_prefix_layouts_step_as_the_official_code_generates():
    assert PREFIX_LM_2D.step([5, GMASK, SOP], SPECIAL) == [0, 1]  # block position counts
    assert PREFIX_LM_1D.step([5, GMASK, SOP], SPECIAL) == [1]  # [gMASK]: positions count on
    assert PREFIX_LM_1D.step([5, MASK, 6, SOP], SPECIAL) == [0]  # [MASK]: frozen at the mask


def test_a_causal_model_has_no_blanks_to_fill():
    with pytest.raises(ValueError, match="causal model has no blanks"):
        CAUSAL.blank_positions(4, 2, 1, to_end=False)
