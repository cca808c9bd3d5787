"""runtime.graph_io: the graph I/O names exporters and backends share (optimum's / ONNX Runtime
GenAI's spelling; test_onnx_export checks the exported graphs carry exactly these)."""
from edgevlm.runtime import graph_io as io


def test_names_are_the_published_contract():
    assert (io.PIXEL_VALUES, io.IMAGE_FEATURES, io.INPUT_IDS, io.INPUTS_EMBEDS) == (
        "pixel_values", "image_features", "input_ids", "inputs_embeds")
    assert (io.ATTENTION_MASK, io.POSITION_IDS, io.LOGITS) == ("attention_mask", "position_ids", "logits")
    assert (io.past_key(3), io.past_value(3)) == ("past_key_values.3.key", "past_key_values.3.value")
    assert (io.present_key(3), io.present_value(3)) == ("present.3.key", "present.3.value")


def test_kv_names_pair_up_in_layer_order():
    past, present = io.past_names(2), io.present_names(2)
    assert past == [io.past_key(0), io.past_value(0), io.past_key(1), io.past_value(1)]
    assert [io.present_for(p) for p in past] == present
    assert all(io.is_past(p) and not io.is_present(p) for p in past)
    assert all(io.is_present(p) and not io.is_past(p) for p in present)
    assert not io.is_past(io.PIXEL_VALUES) and io.INTEGER_INPUTS == {io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS}
