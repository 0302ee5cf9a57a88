"""What a model is called with, as one structure: positional args, keyword args, constants.

Models take more than one tensor: a Hugging Face vision model takes ``pixel_values=``, a
multi-input network takes ``(image, mask)``, Keras takes a list or dict. Each backend turns the
user's ``inputs`` into a :class:`ModelInputs` once per call, at its boundary, and from then on
works only with that form: it converts and checks every entry with :meth:`ModelInputs.map`, calls
the model with :meth:`ModelInputs.call`, and reads the heatmap's resolution from
:attr:`ModelInputs.spatial`. Nothing here imports a framework: what counts as an array, and as a
floating array with spatial axes, is told by the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .._errors import InputError

Key = int | str
"""An input's name: its position among the positional args, or its keyword."""

KINDS = ("single", "positional", "keyword")


@dataclass(frozen=True)
class ModelInputs:
    """One call's inputs: ``model(*args, **kwargs, **constants)``.

    Attributes:
        args: the positional inputs, in order.
        kwargs: the keyword inputs given with the call (a dict input).
        constants: ``model_kwargs``, the keyword arguments every call passes unchanged (never
            converted or checked: flags such as ``output_hidden_states=False`` live here).
        spatial: the key (an index into ``args`` or a keyword of ``kwargs``) of the input whose
            spatial axes give the heatmap its resolution.
        kind: how the user gave the inputs: ``"single"`` (one array), ``"positional"`` (a tuple
            or list) or ``"keyword"`` (a dict). Keras, which takes a list or dict as *one*
            argument, rebuilds the container from it.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    spatial: Key
    kind: str = "single"
    constants: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: Key) -> Any:
        if isinstance(key, int):
            return self.args[key]
        return self.kwargs[key]

    @property
    def keys(self) -> tuple[Key, ...]:
        """The names of the per-call inputs: positions first, then keywords."""
        return (*range(len(self.args)), *self.kwargs)

    @property
    def spatial_value(self) -> Any:
        """The input that carries the spatial grid."""
        return self[self.spatial]

    def map(self, fn: Callable[[Key, Any], Any]) -> ModelInputs:
        """Returns the structure with every per-call input ``v`` (key ``k``) replaced by ``fn(k, v)``.

        ``constants`` are left as given.
        """
        args = tuple(fn(index, value) for index, value in enumerate(self.args))
        kwargs = {key: fn(key, value) for key, value in self.kwargs.items()}
        return replace(self, args=args, kwargs=kwargs)

    def with_spatial(self, value: Any) -> ModelInputs:
        """Returns the structure with the spatial input replaced by ``value`` (e.g. masked images)."""
        if isinstance(self.spatial, int):
            args = tuple(value if index == self.spatial else old for index, old in enumerate(self.args))
            return replace(self, args=args)
        return replace(self, kwargs={**self.kwargs, self.spatial: value})

    def call(self, fn: Callable[..., Any]) -> Any:
        """Returns ``fn(*args, **kwargs, **constants)``."""
        return fn(*self.args, **self.kwargs, **self.constants)

    def container(self) -> Any:
        """Returns the inputs the way the user gave them: one value, a list or a dict."""
        if self.kind == "single":
            return self.args[0]
        if self.kind == "positional":
            return list(self.args)
        return dict(self.kwargs)

    def describe(self) -> str:
        """Returns ``"0: (2, 3, 32, 32), 'mask': (2, 1, 32, 32)"`` for error messages."""
        return ", ".join(f"{key!r}: {_shape(self[key])}" for key in self.keys) or "none"


def looks_spatial(value: Any) -> bool:
    """Returns whether ``value`` is a floating-point array with at least 3 axes ``(N, ?, ?, ...)``.

    Read from ``shape`` and the dtype's name, so it holds for NumPy, torch, TensorFlow and JAX
    arrays alike ("float32", "torch.bfloat16", "<dtype: 'float16'>"): the default rule for which
    input carries the spatial grid, the same in the adapters and in the Explainer's Score-CAM.
    """
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return False
    try:
        rank = len(shape)
    except TypeError:  # an unknown rank (a symbolic TensorFlow shape)
        return False
    return rank >= 3 and "float" in str(dtype)


def _shape(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is None:
        return type(value).__name__
    try:
        return str(tuple(int(s) for s in shape))
    except TypeError:  # symbolic (None) dimensions
        return str(tuple(shape))


def structure_inputs(
    inputs: Any,
    *,
    is_spatial: Callable[[Any], bool],
    spatial_input: Key | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ModelInputs:
    """Returns ``inputs`` as a :class:`ModelInputs`.

    A tuple or list is passed positionally, a dict (any ``Mapping``) as keyword arguments,
    anything else as the one positional argument. The spatial input is ``spatial_input`` (an
    index into a tuple/list, a key of a dict; ``0`` for a single input) or, by default, the first
    input of a tuple/list/dict for which ``is_spatial`` holds (the backend's "floating array with
    spatial axes"); a single input is always the spatial one.

    Args:
        inputs: one array, a tuple/list of them, or a dict of them.
        is_spatial: the backend's predicate for an input that can carry the heatmap's grid.
        spatial_input: the input that carries the grid, or None to pick it.
        model_kwargs: constant keyword arguments for every call; a key also given by a dict
            input is an error.

    Raises:
        anycam.InputError: an empty container, a ``spatial_input`` that names no input (the
            message lists the inputs), no input with spatial axes, a keyword given twice, or
            batched inputs (arrays with at least one axis) whose batch size N differs from the
            spatial input's (:func:`check_batch_sizes`).
    """
    constants = dict(model_kwargs or {})
    if not all(isinstance(key, str) for key in constants):
        raise InputError(f"model_kwargs keys must be strings (keyword names), got {sorted(map(repr, constants))}")
    if isinstance(inputs, Mapping):
        if not all(isinstance(key, str) for key in inputs):
            raise InputError("a dict input is passed as keyword arguments, so its keys must be strings")
        structure = ModelInputs((), dict(inputs), "", kind="keyword", constants=constants)
        twice = sorted(set(structure.kwargs) & set(constants))
        if twice:
            raise InputError(
                f"keyword(s) {', '.join(map(repr, twice))} given both in the inputs and in model_kwargs; "
                "pass each once"
            )
    elif isinstance(inputs, (tuple, list)):
        structure = ModelInputs(tuple(inputs), {}, 0, kind="positional", constants=constants)
    else:
        structure = ModelInputs((inputs,), {}, 0, kind="single", constants=constants)
    if not structure.keys:
        raise InputError(f"the inputs are an empty {type(inputs).__name__}; pass at least one array")

    if spatial_input is not None:
        key: Key = spatial_input
        # A bool is an int to Python; spatial_input=True naming input 1 would be a silent surprise.
        valid = not isinstance(key, bool) and key in structure.keys
        if structure.kind == "single" and key in (0, -1):
            valid = True
            key = 0
        elif isinstance(key, int) and not isinstance(key, bool) and -len(structure.args) <= key < 0:
            valid = True
            key = len(structure.args) + key
        if not valid:
            raise InputError(
                f"spatial_input={spatial_input!r} names no input; the inputs are {structure.describe()} "
                "(an index for a tuple/list, a key for a dict)"
            )
        return check_batch_sizes(replace(structure, spatial=key))

    if structure.kind == "single":
        # One input carries the grid by definition; the backend's own checks say what is wrong.
        return structure
    for key in structure.keys:
        if is_spatial(structure[key]):
            return check_batch_sizes(replace(structure, spatial=key))
    raise InputError(
        f"no input is a floating-point array with spatial axes; the inputs are {structure.describe()}; "
        "pass the image as a float array (N, C, *spatial), or name it with spatial_input="
    )


def batch_size(value: Any) -> int | None:
    """Returns the leading dimension of an array ``value`` with at least one axis, else None.

    None for what has no shape (flags, None, Python lists), a 0-d array, or an unknown
    (symbolic) leading dimension.
    """
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        if len(shape) == 0:
            return None
        return int(shape[0])
    except TypeError:  # an unknown rank or a symbolic (None) batch dimension
        return None


def check_batch_sizes(structure: ModelInputs) -> ModelInputs:
    """Returns ``structure`` if every per-call array shares the spatial input's batch size N.

    Every array with at least one axis among the per-call inputs is one sample's row per
    entry; frameworks broadcast a batch of 1 against a batch of N (one image explained with
    the metadata of three), or fail deep inside the model with a message about shapes. So
    the mismatch is refused here, at the boundary every backend passes. ``model_kwargs``
    constants are not checked: values that are the same for every sample belong there.

    Raises:
        anycam.InputError: naming each input and its batch size.
    """
    sizes = {key: batch_size(structure[key]) for key in structure.keys}
    wanted = sizes[structure.spatial]
    if wanted is None:
        return structure
    if all(size is None or size == wanted for size in sizes.values()):
        return structure
    listed = ", ".join(f"{key!r}: N={size}" for key, size in sizes.items() if size is not None)
    raise InputError(
        f"the inputs have different batch sizes ({listed}); every per-sample input must have the spatial "
        f"input {structure.spatial!r}'s N={wanted} rows. Repeat a shared value per sample "
        "(e.g. np.repeat(meta, N, axis=0)), or pass a value that is the same for every sample through "
        "model_kwargs= where the backend takes it"
    )
