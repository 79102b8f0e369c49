"""io.py on its own: tensor sizes, external-data references, lazy weights, node order, staged saving.

The command-line behaviour built on top of these is in tests/test_bad_input.py; here each
function's contract is pinned down directly, with exact byte counts and exact arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import float_input, init, model, weights
from onnx import TensorProto, helper, numpy_helper

from onnxcoreset import io as oio
from onnxcoreset.errors import ModelError, OutputError, ResourceError, UsageError


def tiny(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    rng = rng or np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "U"], ["y"], name="out", transB=1),
    ]
    inits = [init("W", weights(rng, 4, 6).T.copy()), init("b", np.arange(6, dtype=np.float32)), init("U", weights(rng, 6, 2).T.copy())]
    return model(nodes, [float_input("x", ["batch", 4])], [float_input("y", ["batch", 2])], inits)


def external_tensor(location: str, dims=(4, 4), **entries: str) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data_type, dims, nbytes",
    [
        (TensorProto.FLOAT, [3, 5], 60),
        (TensorProto.FLOAT16, [7], 14),
        (TensorProto.BFLOAT16, [2, 2], 8),
        (TensorProto.DOUBLE, [0, 9], 0),
        (TensorProto.INT4, [5], 3),  # two per byte, rounded up
        (TensorProto.UINT4, [4], 2),
        (TensorProto.COMPLEX64, [3], 24),
        (TensorProto.STRING, [3], 0),
        (TensorProto.FLOAT, [2**40, 2**40], 4 * 2**80),  # Python integers: no int64 overflow
    ],
)
def test_tensor_nbytes(data_type, dims, nbytes):
    assert oio.tensor_nbytes(TensorProto(name="t", data_type=data_type, dims=dims)) == nbytes


def test_tensor_nbytes_refuses_unknown_types_and_negative_dims():
    with pytest.raises(ModelError, match="unknown data type 77"):
        oio.tensor_nbytes(TensorProto(name="t", data_type=77, dims=[2]))
    with pytest.raises(ModelError, match="unknown data type UNDEFINED"):
        oio.tensor_nbytes(TensorProto(name="t", dims=[2]))
    with pytest.raises(ModelError, match="negative dimension"):
        oio.tensor_nbytes(TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[2, -1]))


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float16).reshape(2, 3),
    np.array([True, False, True]),
    np.arange(-3, 3, dtype=np.int8),
    np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
    np.array(["a", "bc"], dtype=object),
])
def test_typed_fields_of_the_right_length_are_accepted(array):
    tensor = numpy_helper.from_array(array, "t")
    if tensor.HasField("raw_data"):  # from_array writes raw bytes: move them into the typed field
        tensor = helper.make_tensor("t", tensor.data_type, array.shape, array.reshape(-1).tolist())
    m = model([helper.make_node("Identity", ["t"], ["y"])], [], [helper.make_tensor_value_info("y", tensor.data_type, list(array.shape))], [tensor])
    oio.from_proto(m)  # no error


def test_typed_field_of_the_wrong_length_is_refused():
    tensor = helper.make_tensor("t", TensorProto.FLOAT16, [3], [1.0, 2.0, 3.0])
    del tensor.int32_data[-1]
    graph = helper.make_graph([helper.make_node("Identity", ["t"], ["y"])], "g", [], [float_input("y", [3])], [tensor])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(ModelError, match=r"tensor 't' declares shape \[3\] \(3 values\) but stores 2 in int32_data"):
        oio.from_proto(bad)


def test_string_tensor_with_raw_data_is_refused():
    tensor = TensorProto(name="t", data_type=TensorProto.STRING, dims=[1], raw_data=b"abc")
    graph = helper.make_graph([], "g", [], [], [tensor])
    with pytest.raises(ModelError, match="stores raw bytes"):
        oio.check_tensors(helper.make_model(graph, ir_version=10), None, "m")


def test_memory_budget_reads_a_cgroup_limit(monkeypatch, tmp_path):
    limits = {"/sys/fs/cgroup/memory.max": "12345\n", "/sys/fs/cgroup/memory/memory.limit_in_bytes": "max\n"}
    real = Path.read_text

    def fake_read_text(self, *args, **kwargs):
        if str(self) in limits:
            return limits[str(self)]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", fake_read_text)
    assert oio.memory_budget() == 12345


def test_sparse_initializer_counts_its_dense_size(monkeypatch):
    values = numpy_helper.from_array(np.ones(2, np.float32), "s")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "s_indices")
    sparse = helper.make_sparse_tensor(values, indices, [1000, 1000])
    graph = helper.make_graph([], "g", [], [], sparse_initializer=[sparse])
    monkeypatch.setattr(oio, "memory_budget", lambda: 1_000_000)  # dense: 4 MB
    with pytest.raises(ResourceError, match="more than this machine's"):
        oio.check_tensors(helper.make_model(graph, ir_version=10), None, "m")


# --- external references --------------------------------------------------------------------


@pytest.mark.parametrize("location", ["/abs/w.bin", "C:\\w.bin", "c:w.bin", "\\\\host\\share\\w.bin", "\\w.bin", "//host/w.bin"])
def test_absolute_locations_in_any_convention_are_refused(tmp_path, location):
    with pytest.raises(ModelError, match="is absolute; refused"):
        oio.check_external_ref(external_tensor(location), tmp_path)


@pytest.mark.parametrize("location", ["../w.bin", "a/../../w.bin", "a\\..\\..\\w.bin", "..", "a/.."])
def test_parent_references_in_any_convention_are_refused(tmp_path, location):
    with pytest.raises(ModelError, match="contains '..'; refused"):
        oio.check_external_ref(external_tensor(location), tmp_path)


@pytest.mark.parametrize("location", ["w\x00.bin", "w\t.bin", "w\x7f.bin"])
def test_control_characters_are_refused(tmp_path, location):
    with pytest.raises(ModelError, match="control characters"):
        oio.check_external_ref(external_tensor(location), tmp_path)


def test_a_harmless_backslash_name_is_not_a_separator_on_posix(tmp_path):
    if os.sep == "\\":
        pytest.skip("on Windows the backslash is a separator")
    (tmp_path / "dir\\w.bin").write_bytes(b"\0" * 64)  # one file whose name contains a backslash
    ref = oio.check_external_ref(external_tensor("dir\\w.bin"), tmp_path)
    assert ref.path.name == "dir\\w.bin" and ref.length == 64


def test_symlink_loop_is_refused(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ModelError, match="tensor 'w'"):
        oio.check_external_ref(external_tensor("a"), tmp_path)


def test_external_ref_offsets(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 100)
    assert oio.check_external_ref(external_tensor("w.bin", offset="36"), tmp_path) == oio.ExternalRef((tmp_path / "w.bin").resolve(), 36, 64)
    assert oio.check_external_ref(external_tensor("w.bin", offset="10", length="64"), tmp_path).offset == 10
    with pytest.raises(ModelError, match=r"\[40, 104\) lies past the end of 'w.bin' \(100 bytes\)"):
        oio.check_external_ref(external_tensor("w.bin", offset="40"), tmp_path)
    with pytest.raises(ModelError, match="length ' 64' is not a non-negative integer"):
        oio.check_external_ref(external_tensor("w.bin", length=" 64"), tmp_path)


# --- loading and reading --------------------------------------------------------------------


def test_from_proto_never_modifies_the_callers_model():
    m = tiny()
    before = m.SerializeToString()
    loaded = oio.from_proto(m)
    loaded.store.write("W", np.zeros((3, 4), np.float32))
    oio.finish(loaded)
    assert m.SerializeToString() == before


def test_weight_store_reads_initializers_constants_and_external_data(tmp_path):
    m = tiny()
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((2,), 7.0, np.float32), "c")))
    m.graph.node.append(helper.make_node("Add", ["y", "c"], ["z"]))
    m.graph.output.append(float_input("z", ["batch", 2]))
    onnx.save_model(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = oio.load(tmp_path / "m.onnx")
    store = loaded.store
    np.testing.assert_array_equal(store.read("b"), np.arange(6, dtype=np.float32))
    assert isinstance(store.read("W"), np.memmap) and store.shape("W") == (6, 4)
    np.testing.assert_array_equal(store.read("c"), [7.0, 7.0])
    with pytest.raises(ValueError):
        store.read("b")[0] = 1  # stored weights are read-only
    store.write("b", np.ones(3))
    assert store.read("b").dtype == np.float32 and store.shape("b") == (3,)
    assert [p.name for p in loaded.input_files()] == ["m.onnx", "m.data"]


# --- node order -----------------------------------------------------------------------------


def test_topological_order_is_none_for_sorted_graphs_and_stable_otherwise():
    m = tiny()
    assert oio.topological_order(m.graph) is None
    nodes = list(m.graph.node)
    graph = helper.make_graph([nodes[2], nodes[0], nodes[1]], "g", list(m.graph.input), list(m.graph.output), list(m.graph.initializer))
    assert oio.topological_order(graph) == [1, 2, 0]


def test_subgraph_outer_reads_count_as_dependencies():
    body = helper.make_graph([helper.make_node("Identity", ["late"], ["z"])], "then", [], [float_input("z", [1])])
    nodes = [
        helper.make_node("If", ["cond"], ["out"], then_branch=body, else_branch=body, name="if"),
        helper.make_node("Identity", ["x"], ["late"], name="producer"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), float_input("x", [1])],
                              [float_input("out", [1])])
    assert oio.topological_order(graph) == [1, 0]


def test_cycles_are_a_model_error():
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    graph = helper.make_graph(nodes, "g", [], [float_input("a", [1])])
    with pytest.raises(ModelError, match="cycle"):
        oio.topological_order(graph)


# --- staged saving --------------------------------------------------------------------------


def test_stage_writes_nothing_visible_until_commit(tmp_path):
    loaded = oio.from_proto(tiny())
    staged = oio.stage(loaded, tmp_path / "out.onnx")
    visible = [p.name for p in tmp_path.iterdir()]
    assert visible == [staged.folder.name] and staged.folder.name.startswith(".out.onnx.")
    assert staged.commit() == [tmp_path / "out.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_failure_while_staging_leaves_nothing(tmp_path, monkeypatch):
    loaded = oio.from_proto(tiny())

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(oio.WeightStore, "materialize", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        oio.stage(loaded, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_commit_leaves_nothing(tmp_path, monkeypatch):
    loaded = oio.from_proto(tiny())
    staged = oio.stage(loaded, tmp_path / "out.onnx", external=True)
    real_replace = os.replace

    def refuse_the_model(source, target):
        if Path(target).name == "out.onnx":
            raise OSError(13, "Permission denied")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_model)
    with pytest.raises(OutputError, match="Permission denied"):
        staged.commit()
    assert list(tmp_path.iterdir()) == []  # the data file already moved is taken back


def test_save_refuses_to_overwrite_the_input_or_its_data(tmp_path):
    onnx.save_model(tiny(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="o.onnx.data", size_threshold=0)
    with pytest.raises(UsageError, match="would overwrite the input model"):
        oio.save(oio.load(tmp_path / "m.onnx"), tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="external data 'o.onnx.data'"):
        oio.save(oio.load(tmp_path / "m.onnx"), tmp_path / "o.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx.data"]
    written = oio.save(oio.load(tmp_path / "m.onnx"), tmp_path / "o.onnx", overwrite_input=True)
    assert [p.name for p in written] == ["o.onnx.data", "o.onnx"]
    reread = oio.load(tmp_path / "o.onnx")
    np.testing.assert_array_equal(reread.store.read("b"), np.arange(6, dtype=np.float32))


@pytest.mark.parametrize("external", [False, True])
def test_saving_is_deterministic(tmp_path, external):
    outputs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        loaded = oio.from_proto(tiny())
        loaded.store.write("W", np.asarray(loaded.store.read("W"))[:3])
        oio.save(loaded, folder / "out.onnx", external=external)
        outputs.append({p.name: p.read_bytes() for p in folder.iterdir()})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == (["out.onnx", "out.onnx.data"] if external else ["out.onnx"])


def test_write_text_is_atomic(tmp_path):
    oio.write_text(tmp_path / "r.json", "{}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and (tmp_path / "r.json").read_text() == "{}\n"
    with pytest.raises(OutputError, match="does not exist"):
        oio.write_text(tmp_path / "missing" / "r.json", "x")
