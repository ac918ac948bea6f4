"""Every hook qcompiler calls. Plugins (built-in or third-party) implement them with `hookimpl`.

All hooks take keyword arguments only and return lists; the registry turns the lists into one
name -> object table per kind and refuses a name registered twice.
"""

import pluggy

hookspec = pluggy.HookspecMarker("qcompiler")
hookimpl = pluggy.HookimplMarker("qcompiler")


@hookspec
def qcompiler_register_passes():
    """Return a list of Pass subclasses (see `qcompiler.passmanager.Pass`); each has a unique `name`."""


@hookspec
def qcompiler_register_frontends():
    """Return a list of frontend objects (see `qcompiler.protocols.Frontend`): they load a model
    (a path or a Python object) and trace it into a `Graph`."""


@hookspec
def qcompiler_register_backends():
    """Return a list of backend objects (see `qcompiler.protocols.Backend`): they lower a compressed
    `Graph` to an artifact folder and load such a folder back for running."""


@hookspec
def qcompiler_register_model_specs():
    """Return a list of `qcompiler.model_spec.ModelSpec`: what a model family (its `name`, the
    transformers model_type) needs beyond what qcompiler derives from the model."""
