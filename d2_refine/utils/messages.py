"""The one line of an exception that a user's error message quotes (torch only, no detectron2)."""

__all__ = ["exception_line"]


def exception_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none. A KeyError's ``str()`` is the repr
    of its message (yacs and detectron2 raise KeyErrors with sentences): its message is taken as it is, so that no
    quote of the message is stripped with the repr's."""
    single = len(exc.args) == 1 and isinstance(exc.args[0], str)
    text = (exc.args[0] if isinstance(exc, KeyError) and single else str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
