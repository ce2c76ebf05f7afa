"""The one-line messages of setup_cfg's ConfigError (d2_refine/engine/config.py)."""
import pytest

pytest.importorskip("detectron2")


@pytest.mark.parametrize("exc, line", [
    # yacs' KeyErrors: str() quotes the message (with " when it holds a '): the quotes go
    (KeyError("Non-existent config key: MODEL.NOPE"),
     "unknown config key MODEL.NOPE (not defined by detectron2 or d2_refine)"),
    (KeyError("Key A was renamed to B; please update your config. note: use 'x'"),
     "Key A was renamed to B; please update your config. note: use 'x'"),
    # a message that ends in a quote keeps it
    (KeyError('Key A was renamed to B; please update your config. IOU_NMS False -> "plain"'),
     'Key A was renamed to B; please update your config. IOU_NMS False -> "plain"'),
    (ValueError('NMS must be "plain"'), 'NMS must be "plain"'),
    (ValueError("'a' vs 'b'"), "'a' vs 'b'"),
    (KeyError("FOO"), "FOO"),
    (AssertionError(), "AssertionError"),
    (ValueError("first line\nsecond line"), "first line"),
])
def test_describe_keeps_the_message_and_drops_the_key_error_quotes(exc, line):
    from d2_refine.engine.config import _describe

    assert _describe(exc) == line
