"""d2_refine.config.renamed: an old key merged from a YAML or from the command line is one line naming the new key."""
import pytest
from fvcore.common.config import CfgNode as CN

from d2_refine.config.renamed import register_renamed_keys


def _cfg():
    cfg = CN({"MODEL": {"NEW": {"A": 1, "SUB": {"B": 2}}, "KEY_TEST": 0.5}})
    register_renamed_keys(cfg, {"MODEL.OLD": "MODEL.NEW", "MODEL.KEY": ("MODEL.KEY_TEST", "test-time only")})
    return cfg


@pytest.mark.parametrize("old,new", [("MODEL.OLD.A", "MODEL.NEW.A"), ("MODEL.OLD.SUB.B", "MODEL.NEW.SUB.B"),
                                     ("MODEL.KEY", "MODEL.KEY_TEST")])
def test_command_line(old, new):
    with pytest.raises(KeyError, match=f"Key {old} was renamed to {new}; please update your config") as e:
        _cfg().merge_from_list([old, "3"])
    assert "\n" not in str(e.value)


def test_yaml_and_note(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("MODEL:\n  OLD:\n    A: 3\n")
    with pytest.raises(KeyError, match="Key MODEL.OLD was renamed to MODEL.NEW;"):
        _cfg().merge_from_file(str(f))
    f.write_text("MODEL:\n  KEY: 0.3\n")
    with pytest.raises(KeyError, match="renamed to MODEL.KEY_TEST; please update your config. Note: test-time only"):
        _cfg().merge_from_file(str(f))


def test_new_keys_merge_clone_keeps_the_table_and_registering_twice_is_a_noop():
    cfg = _cfg()
    cfg.merge_from_list(["MODEL.NEW.SUB.B", "5", "MODEL.KEY_TEST", "0.7"])
    assert cfg.MODEL.NEW.SUB.B == 5 and cfg.MODEL.KEY_TEST == 0.7
    register_renamed_keys(cfg, {"MODEL.OLD": "MODEL.NEW"})
    with pytest.raises(KeyError, match="renamed to MODEL.NEW.A"):
        cfg.clone().merge_from_list(["MODEL.OLD.A", "1"])


def test_an_old_key_still_defined_is_a_bug():
    with pytest.raises(ValueError, match="MODEL.NEW is registered as renamed but is still defined"):
        register_renamed_keys(CN({"MODEL": {"NEW": 1}}), {"MODEL.NEW": "MODEL.OTHER"})


@pytest.mark.parametrize("opts,new", [
    (["MODEL.FPT.GT.MODE", "dot"], "MODEL.FPT.GROUNDING.MODE"),
    (["MODEL.FPT.PRESET", "fpt_lite"], "Base-FPT-lite.yaml"),
    (["MODEL.INTERNET.WARMUP_FRACTION", "0.1"], "MODEL.INTERNET.WARMUP_ITERS"),
    (["MODEL.IOU_NET.NMS_GUIDE", "weight"], "MODEL.IOU_NET.NMS_TEST"),
])
def test_train_net_config_says_it_in_one_line(opts, new):
    pytest.importorskip("detectron2")
    from d2_refine.engine import setup_cfg

    with pytest.raises(ValueError, match=f"in command-line options: Key {opts[0]} was renamed to .*{new}") as e:
        setup_cfg("", opts)
    assert "\n" not in str(e.value)
