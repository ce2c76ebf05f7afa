"""MODEL.IFR: torchdeq's solver names, test-time values in ``_TEST``, and the earlier names refused in one line."""
import pytest

from d2_refine.projects.ifr.config import RENAMED_KEYS, add_ifr_config
from helpers import bare_model_cfg


def _cfg():
    return bare_model_cfg(add_ifr_config)


def test_solver_keys_follow_torchdeq():
    c = _cfg().MODEL.IFR
    assert (c.F_MAX_ITER, c.B_MAX_ITER, c.F_MAX_ITER_TEST) == (15, 15, 15)
    assert (c.F_TOL, c.B_TOL) == (1e-5, 2e-10)
    assert (c.ANDERSON.M, c.ANDERSON.LAM, c.ANDERSON.TAU) == (6, 1e-4, 1.0)
    assert (c.F_SOLVER, c.F_SOLVER_TEST) == ("broyden", "")  # "": the training solver at test time too


def test_renamed_keys_point_to_existing_keys():
    cfg = _cfg()
    for old, new in RENAMED_KEYS.items():
        node = cfg
        for part in new.split(".")[:-1]:
            node = node[part]
        assert new.split(".")[-1] in node, new
        assert old.split(".")[-1] not in node, old


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_old_key_gives_one_line_naming_the_new_key(old, tmp_path):
    with pytest.raises(KeyError, match=f"{old} was renamed to {RENAMED_KEYS[old]}"):
        _cfg().merge_from_list([old, "3"])
    # the same from a YAML file
    parts = old.split(".")
    text = "".join("  " * i + p + ":\n" for i, p in enumerate(parts[:-1]))
    text += "  " * (len(parts) - 1) + f"{parts[-1]}: 3\n"
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(KeyError, match=f"{old} was renamed to {RENAMED_KEYS[old]}") as e:
        _cfg().merge_from_file(str(path))
    assert "\n" not in str(e.value)
