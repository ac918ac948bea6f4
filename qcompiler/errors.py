"""Errors a user can act on.

A `QCompilerError` carries one line that names the problem and the fix; the CLI prints it and
exits with status 2, never a traceback.
"""


class QCompilerError(Exception):
    """Bad input or an impossible option combination, with the fix in the message."""


class PassError(QCompilerError):
    """A pass failed; the message says which pass and which passes ran before it."""


def export_failed(runtime: str, what: str, exc: BaseException) -> QCompilerError:
    """The one-line error for a model an exporter cannot trace or convert (naming the ops it lacks)."""
    import re

    text = str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    ops = sorted(set(re.findall(r"\b(?:aten|prim)::\w+", text)))
    if ops:
        detail = f"ops it cannot convert: {', '.join(ops[:6])}"
    else:
        detail = next((line for line in lines if "not supported" in line.lower()), lines[0] if lines else
                      type(exc).__name__)
    return QCompilerError(f"the {runtime} export cannot convert {what} ({detail[:200]}): use --backend torch for "
                          "this model, or report its family")
