"""The exceptions petl_surgery raises, in two families users can catch by type.

Raised before anything is changed (the model and every file are as they were)::

    SurgeryError (a ValueError)
    ├── OptionError            an unknown method or option, a value out of range, layers= out of range
    ├── UnsupportedModelError  a model, block or attention the method cannot operate on
    │   └── UnsupportedBlockError  one block lacks what the method needs (skip_unsupported=True skips it)
    └── CheckpointError        a file that is not a delta, is damaged, or does not fit the model

Raised during a forward, after surgery was done::

    SurgeryRuntimeError (a RuntimeError, not a SurgeryError)
    ├── BranchNeverRanError    an inserted branch did not run in the first forward after surgery
    └── StatefulBaseError      a training forward changed base buffers the delta neither freezes nor saves

A plain ``SurgeryError`` is a request that conflicts with the surgery already on the model (a method
applied twice, ``remove`` of a method that is not there).
"""


class SurgeryError(ValueError):
    """A request petl_surgery cannot carry out: an unknown method or option, a layer out of range, a
    model it cannot operate on, or a checkpoint that does not fit.

    It is always raised before the model or any file is changed, and its message names the offending
    method, option, layer or tensor.
    """


class OptionError(SurgeryError):
    """An argument that is wrong whatever the model: an unknown method or option, an option's value of the
    wrong type or out of its range, a ``layers`` selection out of range or empty."""


class UnsupportedModelError(SurgeryError):
    """A model, or a part of it, that the method cannot operate on: no block found, attention of a class
    no layout describes, a block without the site the method needs, a wrapper around the model."""


class UnsupportedBlockError(UnsupportedModelError):
    """A chosen block lacks what the method needs (``apply(..., skip_unsupported=True)`` skips such blocks)."""


class CheckpointError(SurgeryError):
    """A checkpoint that cannot be read into this model: not a delta file, damaged or tampered with,
    or recording a surgery or tensors that do not fit the model."""


class SurgeryRuntimeError(RuntimeError):
    """A check that fails during a forward pass, after surgery changed the model: the surgery is in place,
    and something about how the model runs breaks a promise (a branch that never runs, a base buffer
    that training changes). Not a :class:`SurgeryError`, which promises that nothing was changed."""
