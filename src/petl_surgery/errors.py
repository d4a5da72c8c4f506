"""The one exception type for user errors."""


class SurgeryError(ValueError):
    """A request petl_surgery cannot carry out: an unknown method or option, a layer out of range, a
    model it cannot operate on, or a checkpoint that does not fit.

    It is always raised before the model or any file is changed, and its message names the offending
    method, option, layer or tensor.
    """
