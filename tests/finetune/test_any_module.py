"""fit on a plain nn.Module as a practitioner hands it over: wrong name types, other dtypes, run_dir mistakes,
the mode of the returned model."""
from __future__ import annotations

import pytest
import torch

from finetune.core.errors import ConfigError
from finetune.core.recipe import prepare_model
from tests.finetune.test_train import cfg, run, sets, tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sets(tmp_path_factory.mktemp("anydata") / "data")


@pytest.mark.parametrize("what", ["stages None", "flat stages", "module stages", "module head"])
def test_stages_and_head_that_are_not_names_are_one_config_error(what):
    model = tiny_model()
    stages, head = (("stem",), ("block",)), "fc"
    if what == "stages None":
        stages = None
    elif what == "flat stages":
        stages = ["stem", "block"]          # iterated letter by letter before: "stage 0 names 's'"
    elif what == "module stages":
        stages = [[model.stem], [model.block]]
    else:
        head = model.fc
    with pytest.raises(ConfigError, match="module name"):
        prepare_model(model, stages, head, 3, [3, 3, 3], cfg())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_in_another_dtype_trains_in_float32(data, dtype):
    said = []
    result = run(data, cfg(freeze="none"), model=tiny_model().to(dtype), log=said.append)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    assert result.model.fc.out_features == 3
    assert any("converted to float32" in line for line in said)


def test_a_run_dir_that_is_a_file_is_a_config_error(data, tmp_path):
    taken = tmp_path / "file.txt"
    taken.write_text("x")
    with pytest.raises(ConfigError, match="run folder"):
        run(data, cfg(), run_dir=taken)


@pytest.mark.parametrize("how", ["no val set", "cached head"])
def test_the_returned_model_is_in_eval_mode(data, how):
    train, val = data
    if how == "no val set":
        result = run((train, None), cfg(freeze="none"))
    else:
        result = run(data, cfg(fast_head=True, head_epochs=1, epochs=2, freeze="none"))
    assert not result.model.training


@pytest.mark.parametrize("what", ["config dict", "config None", "train list", "val ImageFolder-like", "model"])
def test_arguments_of_the_wrong_kind_are_one_finetune_error(data, what):
    from finetune.core.errors import DataError, FinetuneError
    from tests.finetune.test_train import DATA_CONFIG, STAGES
    from finetune.tools.train import fit

    train, val = data
    model, config = tiny_model(), cfg()
    if what == "config dict":
        config, expected = {"epochs": 1}, ConfigError
    elif what == "config None":
        config, expected = None, ConfigError
    elif what == "train list":
        train, expected = train.items, DataError
    elif what == "val ImageFolder-like":
        val, expected = object(), DataError
    else:
        model, expected = (lambda x: x), ConfigError
    with pytest.raises(expected) as err:
        fit(model, STAGES, DATA_CONFIG, train, val, config, head="fc")
    assert isinstance(err.value, FinetuneError)


def test_a_forward_with_auxiliary_outputs_is_a_config_error(data):
    from tests.finetune.test_train import Tiny

    class Aux(Tiny):       # torchvision's GoogLeNet/Inception v3 return a namedtuple while training
        def forward(self, x):
            out = super().forward(x)
            return (out, out) if self.training else out

    with pytest.raises(ConfigError, match="aux_logits=False"):
        run(data, cfg(freeze="none"), model=Aux())


def test_reset_head_false_with_a_head_for_other_classes_is_a_config_error(data):
    with pytest.raises(ConfigError, match="reset_head=True"):
        run(data, cfg(), model=tiny_model(), reset_head=False)     # a 10-output head, 3 classes
    result = run(data, cfg(), model=tiny_model(), reset_head=True)
    again = run(data, cfg(), model=result.model, reset_head=False)  # already 3 outputs: kept
    assert again.model.fc.out_features == 3
