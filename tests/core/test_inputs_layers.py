"""The framework-free input structure and layer specs (NumPy stands in for a framework's arrays)."""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam.protocol.inputs import ModelInputs, looks_spatial, structure_inputs
from anycam.protocol.layers import LayerRecord, choose_layer, is_auto, parse_layer


def _spatial(value: object) -> bool:
    return isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating) and value.ndim >= 3


IMAGE = np.zeros((2, 3, 8, 8), np.float32)
MASK = np.zeros((2, 1, 8, 8), np.float32)
IDS = np.zeros((2, 5), np.int64)


def test_a_single_array_is_the_one_positional_and_spatial_input() -> None:
    structure = structure_inputs(IMAGE, is_spatial=_spatial)
    assert structure.kind == "single" and structure.args == (IMAGE,) and structure.kwargs == {}
    assert structure.spatial == 0 and structure.spatial_value is IMAGE
    assert structure.container() is IMAGE


def test_a_single_non_spatial_input_is_still_the_spatial_one() -> None:
    # The backend's own checks (dtype, rank) then say what is wrong with it.
    assert structure_inputs(IDS, is_spatial=_spatial).spatial == 0


def test_a_tuple_is_positional_and_the_first_floating_map_is_spatial() -> None:
    structure = structure_inputs((IDS, IMAGE, MASK), is_spatial=_spatial)
    assert structure.kind == "positional" and structure.spatial == 1
    assert structure.container() == [IDS, IMAGE, MASK]


def test_a_dict_is_keyword_and_model_kwargs_are_constants() -> None:
    structure = structure_inputs({"ids": IDS, "pixel_values": IMAGE}, is_spatial=_spatial, model_kwargs={"flag": 1})
    assert structure.kind == "keyword" and structure.spatial == "pixel_values" and structure.args == ()

    def model(*args: object, **kwargs: object) -> tuple[object, object]:
        return args, kwargs

    args, kwargs = structure.call(model)
    assert args == () and set(kwargs) == {"ids", "pixel_values", "flag"}  # type: ignore[arg-type]
    assert kwargs["flag"] == 1  # type: ignore[index]


def test_spatial_input_by_index_key_and_negative_index() -> None:
    assert structure_inputs((IMAGE, MASK), is_spatial=_spatial, spatial_input=1).spatial == 1
    assert structure_inputs((IMAGE, MASK), is_spatial=_spatial, spatial_input=-1).spatial == 1
    assert structure_inputs({"a": IMAGE, "b": MASK}, is_spatial=_spatial, spatial_input="b").spatial == "b"
    assert structure_inputs(IMAGE, is_spatial=_spatial, spatial_input=0).spatial == 0


@pytest.mark.parametrize(
    ("inputs", "spatial_input"),
    [((IMAGE, MASK), 2), ((IMAGE, MASK), "mask"), ({"a": IMAGE}, "b"), ({"a": IMAGE}, 0), ((IMAGE, MASK), True)],
)
def test_spatial_input_naming_nothing_lists_the_inputs(inputs: object, spatial_input: object) -> None:
    with pytest.raises(anycam.InputError, match="names no input; the inputs are") as info:
        structure_inputs(inputs, is_spatial=_spatial, spatial_input=spatial_input)  # type: ignore[arg-type]
    assert "(2, 3, 8, 8)" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_no_spatial_input_in_a_container_is_an_error_listing_them() -> None:
    with pytest.raises(anycam.InputError, match=r"'ids': \(2, 5\)"):
        structure_inputs({"ids": IDS}, is_spatial=_spatial)


def test_empty_containers_and_keywords_given_twice_are_errors() -> None:
    with pytest.raises(anycam.InputError, match="empty"):
        structure_inputs((), is_spatial=_spatial)
    with pytest.raises(anycam.InputError, match="'pixel_values'.*both"):
        structure_inputs({"pixel_values": IMAGE}, is_spatial=_spatial, model_kwargs={"pixel_values": IMAGE})


def test_map_converts_every_input_and_leaves_constants() -> None:
    structure = structure_inputs((IMAGE, MASK), is_spatial=_spatial, model_kwargs={"flag": "keep"})
    mapped = structure.map(lambda key, value: (key, value.shape))
    assert mapped.args == ((0, IMAGE.shape), (1, MASK.shape)) and mapped.constants == {"flag": "keep"}
    replaced = structure_inputs({"a": IMAGE, "b": MASK}, is_spatial=_spatial).with_spatial("new")
    assert replaced.kwargs == {"a": "new", "b": MASK}
    assert ModelInputs((IMAGE, MASK), {}, 1, kind="positional").with_spatial("new").args == (IMAGE, "new")


def test_layer_specs_parse_the_input_port() -> None:
    assert parse_layer("avgpool:input").layer == "avgpool"
    assert parse_layer("avgpool:input").port == "input"
    assert parse_layer("avgpool:input").label("avgpool") == "avgpool:input"
    assert parse_layer("layer4:output").port == "output"
    assert parse_layer("model/block:3").layer == "model/block:3"  # not a port: kept whole
    obj = object()
    assert parse_layer(obj).layer is obj
    with pytest.raises(anycam.LayerError, match="names no layer"):
        parse_layer(":input")
    assert is_auto(None) and is_auto("auto") and not is_auto("layer4")


def _records() -> list[LayerRecord]:
    return [
        LayerRecord("conv", (2, 8, 16, 16)),
        LayerRecord("act", (2, 8, 16, 16), calls=3),
        LayerRecord("stage", (2, 16, 4, 4)),
        LayerRecord("side", (2, 16, 4, 4), reaches_output=False),
        LayerRecord("pool", (2, 16, 1, 1)),
        LayerRecord("flat", (2, 16)),
        LayerRecord("fc", (2, 10)),
    ]


def test_auto_picks_the_last_layer_with_a_spatial_map_on_the_path() -> None:
    assert choose_layer(_records(), (32, 32)) == "stage"
    # channels-last layers read their spatial axes between N and C.
    last = [LayerRecord("a", (2, 4, 4, 8), layout="channels_last"), LayerRecord("b", (2, 1, 1, 8), "channels_last")]
    assert choose_layer(last, (16, 16)) == "a"
    # A 1-D input needs a 1-D map.
    assert choose_layer([LayerRecord("c1", (2, 4, 9)), LayerRecord("c2", (2, 4, 3, 3))], (9,)) == "c1"


def test_auto_without_a_fit_lists_the_layers_considered() -> None:
    records = _records()[4:]
    with pytest.raises(anycam.LayerError, match="considered: 'pool' \\(output \\(2, 16, 1, 1\\) has spatial size 1\\)"):
        choose_layer(records, (32, 32))
    many = [LayerRecord(f"fc{i}", (2, 4)) for i in range(30)]
    with pytest.raises(anycam.LayerError, match="the last 12 of 30"):
        choose_layer(many, (32, 32))
    with pytest.raises(anycam.LayerError, match="found no layers"):
        choose_layer([], (32, 32))


class _FakeArray:
    """Stands in for a framework tensor: only ``shape`` and a ``dtype`` that prints its name."""

    def __init__(self, shape: tuple[int, ...] | None, dtype: str) -> None:
        self.shape, self.dtype = shape, dtype


def test_looks_spatial_reads_shape_and_dtype_name_of_any_framework() -> None:
    assert looks_spatial(IMAGE) and looks_spatial(IMAGE.astype(np.float16))
    assert not looks_spatial(IDS) and not looks_spatial(np.zeros((2, 3), np.float32))
    assert not looks_spatial(np.zeros((2, 3, 4), np.int32)) and not looks_spatial([[[1.0]]])
    assert looks_spatial(_FakeArray((2, 3, 8, 8), "torch.bfloat16"))
    assert looks_spatial(_FakeArray((2, 8, 8, 3), "<dtype: 'float32'>"))
    assert not looks_spatial(_FakeArray((2, 3, 8, 8), "torch.complex64"))
    assert not looks_spatial(_FakeArray(None, "float32"))
