"""The transfer-methods grid: one config per method, the grid, and its table (issue 10)."""
import pytest

from highres3d import experiments
from highres3d.config import load_config
from highres3d.errors import ConfigError
from highres3d.training.stages import resolve_stages


@pytest.fixture(scope="module")
def base():
    return load_config("demo/transfer_methods.yaml", overrides=["transfer.freeze=2", "training.lr_decay=3"])


def test_each_method_sets_only_its_own_keys(base):
    configs = {m: experiments.method_config(base, m, source_2d="source2d.keras", source_multi_domain="md.keras")
               for m in experiments.TRANSFER_METHODS}
    assert configs["scratch"].transfer.source is None
    assert configs["finetune"].transfer.source == base.transfer.source
    # the base's transfer-method keys are reset for every method
    assert configs["finetune"].transfer.freeze == 0 and configs["finetune"].training.lr_decay is None
    assert [configs[f"freeze{k}"].transfer.freeze for k in range(1, 6)] == [1, 2, 3, 4, 5]
    assert configs["discriminative"].training.lr_decay == 2.6
    gradual = resolve_stages(configs["gradual_unfreezing"])
    assert [s.freeze for s in gradual] == [5, 4, 3, 2, 1, 0] and gradual[-1].last == base.training.max_iter
    assert [s.iterations for s in gradual] == [20, 20, 20, 20, 20, 100]
    assert configs["mean_var"].transfer.transfusion == 0 and configs["transfusion"].transfer.transfusion == 3
    for mode in ("center", "average", "scaled"):
        cfg = configs[f"inflated_{mode}"]
        assert cfg.transfer.inflate == mode and cfg.transfer.source.name == "source2d.keras"
    multi = configs["multi_domain"]
    assert multi.transfer.source.name == "md.keras" and multi.transfer.freeze == 0 and not multi.training.stages
    dual = resolve_stages(configs["dual_stage"])
    assert [(s.sampler.type, s.freeze, s.iterations) for s in dual] == [
        ("class_weighted", 0, 150), ("uniform", "all_but_last", 50)]
    assert dual[0].sampler.class_probabilities == (0.5, 0.5) and dual[1].lr == pytest.approx(base.training.lr / 10)


def test_grid_names_seeds_and_checks(base):
    specs = experiments.transfer_methods_grid(base, repeats=2)
    names = [s.name for s in specs]
    assert names[:2] == ["scratch_r0", "scratch_r1"] and "dual_stage_r1" in names
    assert not any(n.startswith("inflated") for n in names)  # no 2D source given
    assert not any(n.startswith("multi_domain") for n in names)  # no multi-domain trunk given
    assert len(specs) == 2 * (len(experiments.TRANSFER_METHODS) - 4)
    assert {s.seed for s in specs if s.method == "discriminative"} == {base.training.seed, base.training.seed + 1}
    assert specs[3].config(base).training.seed == base.training.seed + 1
    assert [s.name for s in experiments.select_runs(specs, shard="0/13")] == ["scratch_r0", "freeze5_r1"]
    with pytest.raises(ConfigError, match="--source-2d"):
        experiments.transfer_methods_grid(base, ["inflated_center"])
    with pytest.raises(ConfigError, match="--source-multi-domain"):
        experiments.transfer_methods_grid(base, ["multi_domain"])
    with_trunk = experiments.transfer_methods_grid(base, source_multi_domain="preset:some_trunk")
    cell = [s for s in with_trunk if s.method == "multi_domain"]
    assert len(cell) == 1 and str(cell[0].config(base).transfer.source) == "preset:some_trunk"
    with pytest.raises(ConfigError, match="expected one of"):
        experiments.transfer_methods_grid(base, ["fine_tune"])
    with pytest.raises(ConfigError, match="too small for six stages"):
        experiments.transfer_methods_grid(load_config("demo/transfer_methods.yaml", overrides=["training.max_iter=5"]),
                                          ["gradual_unfreezing"])


def test_cli_lists_the_grid(capsys):
    from highres3d.cli.main import main

    assert main(["experiment", "transfer-methods", "--config", "demo/transfer_methods.yaml", "--list",
                 "--methods", "scratch,dual_stage", "--repeats", "2"]) == 0
    assert capsys.readouterr().out.split() == ["scratch_r0", "scratch_r1", "dual_stage_r0", "dual_stage_r1"]
