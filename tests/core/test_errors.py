"""Every user-facing failure is a GraphoptError that says what, where and what to do."""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt import GraphoptError, Pass, PassResult, register_pass
from graphopt.errors import (
    CaptureError,
    EquivalenceError,
    InputMismatchError,
    PassError,
    PipelineError,
    SerializationError,
)
from graphopt.pipeline.parse import flatten, half_pipeline


def test_every_error_is_a_graphopt_error() -> None:
    for cls in (
        CaptureError,
        EquivalenceError,
        InputMismatchError,
        PassError,
        PipelineError,
        SerializationError,
    ):
        assert issubclass(cls, GraphoptError)


# -- capture ------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # python control flow on a tensor value
            return x * 2
        return x - 1


def test_capture_error_names_the_source_line() -> None:
    with pytest.raises(CaptureError) as info:
        graphopt.compile(DataDependent(), (torch.randn(3, 4),))
    message = str(info.value)
    assert "DataDependent" in message
    assert "if x.sum() > 0" in message or "test_errors.py" in message
    assert "Traceback" not in message


def test_capture_error_for_a_non_module() -> None:
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        graphopt.compile(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


def test_capture_error_when_the_model_fails_on_its_example() -> None:
    with pytest.raises(CaptureError, match="fails when run eagerly.*mat1 and mat2"):
        graphopt.compile(nn.Linear(4, 2), (torch.randn(3, 5),))


def test_capture_error_for_bad_example_inputs() -> None:
    with pytest.raises(CaptureError, match="tuple of the model's positional arguments"):
        graphopt.compile(nn.Linear(4, 2), {"x": torch.randn(3, 4)})


# -- pipelines ----------------------------------------------------------------------------------


def test_unknown_pass_lists_the_valid_ones() -> None:
    with pytest.raises(PipelineError) as info:
        graphopt.parse_pipeline("cleanup,fold-bm")
    assert "'fold-bm'" in str(info.value) and "Did you mean 'fold-bn'" in str(info.value)
    assert "dce" in str(info.value) and "remove-noops" in str(info.value)


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(PipelineError, match="no option 'eps'.*max_bytes"):
        graphopt.parse_pipeline("fold-constants{eps=1e-5}")
    with pytest.raises(PipelineError, match="takes no options"):
        graphopt.parse_pipeline("dce{x=1}")


def test_bad_option_value_and_syntax() -> None:
    with pytest.raises(PipelineError, match="max_bytes=lots.*not a valid int"):
        graphopt.parse_pipeline("fold-constants{max_bytes=lots}")
    with pytest.raises(PipelineError, match="expected"):
        graphopt.parse_pipeline("dce,,cse")
    with pytest.raises(PipelineError, match="cannot read ';cse' at column 4"):
        graphopt.parse_pipeline("dce;cse")


@register_pass
@dataclass(frozen=True)
class Early(Pass):
    name = "test-early"
    runs_before = ("test-late",)

    def run(self, gm, ctx):  # type: ignore[no-untyped-def]
        return PassResult(False)


@register_pass
@dataclass(frozen=True)
class Late(Pass):
    name = "test-late"

    def run(self, gm, ctx):  # type: ignore[no-untyped-def]
        return PassResult(False)


def test_ordering_constraints() -> None:
    def names(text: str) -> list[str]:
        return [p.name for p in flatten(graphopt.parse_pipeline(text))]

    assert names("test-early,test-late") == ["test-early", "test-late"]
    # a pass written after one it must run before is placed where it must go
    assert names("test-late,test-early") == ["test-early", "test-late"]
    # inside a group the order is the group's: it is refused, not rearranged
    with pytest.raises(PipelineError, match="'test-early' must run before 'test-late'"):
        graphopt.parse_pipeline("fixpoint(test-late,test-early)")
    # only a pass written too late is moved; one written too early is refused
    with pytest.raises(PipelineError, match="'precision' must run after 'fold-bn'"):
        graphopt.parse_pipeline("precision{dtype=fp16},fold-bn")


@pytest.mark.parametrize(("level", "dtype"), [("-O2", "bf16"), ("-O3", "fp16")])
def test_half_precision_appended_to_a_level_is_placed_before_fusion(level: str, dtype: str):
    def spec(text: str) -> str:
        return ",".join(item.spec() for item in graphopt.parse_pipeline(text))

    assert spec(f"{level},precision{{dtype={dtype}}}") == spec(half_pipeline(level, dtype))


def test_register_pass_checks_name_and_frozen() -> None:
    with pytest.raises(PipelineError, match="kebab-case"):

        @register_pass
        @dataclass(frozen=True)
        class BadName(Pass):
            name = "Bad_Name"

    with pytest.raises(PipelineError, match="subclass of graphopt.Pass"):

        @register_pass  # type: ignore[arg-type]
        @dataclass(frozen=True)
        class NotAPass:
            name = "not-a-pass"


def test_bad_compile_arguments() -> None:
    with pytest.raises(GraphoptError, match="on_fail"):
        graphopt.compile(nn.Linear(2, 2), (torch.randn(1, 2),), on_fail="ignore")
    with pytest.raises(GraphoptError, match="target='tpu'"):
        graphopt.compile(nn.Linear(2, 2), (torch.randn(1, 2),), target="tpu")


# -- calls --------------------------------------------------------------------------------------


class Two(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.sum(-1) + y


@pytest.fixture(scope="module")
def two() -> graphopt.CompiledModule:
    return graphopt.compile(Two(), (torch.randn(4, 3), torch.randn(4)))


def test_input_mismatch_arity(two: graphopt.CompiledModule) -> None:
    with pytest.raises(InputMismatchError, match="1 positional argument.*expected 2"):
        two(torch.randn(4, 3))


def test_input_mismatch_dtype(two: graphopt.CompiledModule) -> None:
    with pytest.raises(
        InputMismatchError,
        match=r"input 0: wrong dtype: expected float32\[\*, 3\].*got float16\[4, 3\]",
    ):
        two(torch.randn(4, 3).half(), torch.randn(4))


def test_input_mismatch_rank_and_shape(two: graphopt.CompiledModule) -> None:
    with pytest.raises(InputMismatchError, match="wrong rank"):
        two(torch.randn(4, 3, 1), torch.randn(4))
    with pytest.raises(InputMismatchError, match=r"wrong shape: expected float32\[\*, 3\]"):
        two(torch.randn(4, 7), torch.randn(4))


def test_input_mismatch_device(two: graphopt.CompiledModule) -> None:
    with pytest.raises(
        InputMismatchError,
        match=r"wrong device: expected float32\[\*, 3\] on cpu, got float32\[4, 3\] on meta",
    ):
        two(torch.empty(4, 3, device="meta"), torch.randn(4))


def test_input_mismatch_keywords(two: graphopt.CompiledModule) -> None:
    with pytest.raises(InputMismatchError, match="keyword arguments"):
        two(torch.randn(4, 3), torch.randn(4), z=1)


# -- files --------------------------------------------------------------------------------------


def test_load_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="no file at"):
        graphopt.load(tmp_path / "nope.graphopt")
    junk = tmp_path / "junk.graphopt"
    junk.write_bytes(b"not a model")
    with pytest.raises(SerializationError, match="not a graphopt model file or is corrupt"):
        graphopt.load(junk)
    bad = tmp_path / "bad.graphopt"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(
            "graphopt.json", '{"format": "graphopt-model/1", "pipeline": "", "target": "cpu"}'
        )
        zf.writestr("program.pt2", b"garbage")
    with pytest.raises(SerializationError, match="corrupt or from an incompatible torch"):
        graphopt.load(bad)


def test_save_rejects_other_objects(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="expects what graphopt.compile returned"):
        graphopt.save(nn.Linear(2, 2), tmp_path / "x")  # type: ignore[arg-type]


def test_save_into_a_missing_folder_says_so(two: graphopt.CompiledModule, tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="the folder .*nope does not exist; create it"):
        graphopt.save(two, tmp_path / "nope" / "m.graphopt")
    with pytest.raises(SerializationError, match="is a folder; give a file path"):
        graphopt.save(two, tmp_path)


def test_load_of_a_file_whose_metadata_lacks_a_key_names_it(
    two: graphopt.CompiledModule, tmp_path: Path
) -> None:
    good = tmp_path / "good.graphopt"
    graphopt.save(two, good)
    with zipfile.ZipFile(good) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    meta = json.loads(files["graphopt.json"])
    del meta["signature"]["kwarg_names"]
    files["graphopt.json"] = json.dumps(meta).encode()
    edited = tmp_path / "edited.graphopt"
    with zipfile.ZipFile(edited, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(SerializationError, match="graphopt.json.* has no 'kwarg_names'; the file"):
        graphopt.load(edited)


@pytest.mark.parametrize("pipeline", [None, 123, 1.5])
def test_a_pipeline_that_is_not_text_or_a_list_is_a_pipeline_error(pipeline: object) -> None:
    with pytest.raises(PipelineError, match=r"give a pipeline string \('-O1'"):
        graphopt.compile(nn.Linear(2, 2), (torch.randn(1, 2),), pipeline=pipeline)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [5, "batches.pt", torch.ones(4, 2)])
def test_calibration_data_that_is_not_batches_is_refused(data: object) -> None:
    with pytest.raises(GraphoptError, match="calibration_data is a .*; give an iterable of batch"):
        graphopt.compile(
            nn.Linear(2, 2), (torch.randn(1, 2),), pipeline="int8", calibration_data=data
        )


def test_calibration_batches_shaped_unlike_the_inputs_are_refused() -> None:
    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU()), torch.randn(4, 16)
    for batches, message in [
        ([torch.randn(8, 16), torch.randn(4, 12)], r"batch 1: input 0 has shape \(4, 12\); the "
         r"model was captured for \(N, 16\)"),
        ([torch.randn(4, 16).double()], "batch 0: input 0 is a 2-d float64 tensor"),
        ([torch.randn(4, 4, 16)], "batch 0: input 0 is a 3-d float32 tensor"),
    ]:  # fmt: skip
        with pytest.raises(GraphoptError, match=message):
            graphopt.compile(model, (x,), pipeline="int8", calibration_data=batches)


def test_messages_are_not_tracebacks() -> None:
    with pytest.raises(GraphoptError) as info:
        graphopt.parse_pipeline("nonexistent")
    assert "Traceback" not in str(info.value) and len(str(info.value).splitlines()) == 1


def test_input_mismatch_batch_sizes_must_agree(two: graphopt.CompiledModule) -> None:
    assert two(torch.randn(6, 3), torch.randn(6)).shape == (6,)  # another batch size is fine
    with pytest.raises(InputMismatchError, match="inputs 0 and 1 must have the same batch size"):
        two(torch.randn(4, 3), torch.randn(5))


def test_every_option_with_choices_is_checked_when_parsed() -> None:
    checked = 0
    for name, cls in graphopt.registered_passes().items():
        for f in dataclasses.fields(cls):
            rules = f.metadata.get("graphopt_option")
            if rules and rules["choices"]:
                allowed = ", ".join(map(str, rules["choices"]))
                with pytest.raises(PipelineError, match=re.escape(f"is not one of {allowed}")):
                    graphopt.parse_pipeline(f"{name}{{{f.name}=typo}}")
                checked += 1
    assert checked >= 8  # int8 (5) and prune (3), at least


def test_option_ranges_and_python_construction_are_checked_too() -> None:
    with pytest.raises(PipelineError, match=r"int8\{smooth=2.0\}: smooth must be in \[0, 1\]"):
        graphopt.parse_pipeline("int8{smooth=2}")
    from graphopt.passes.prune import Prune

    with pytest.raises(PipelineError, match=r"amount must be in \[0, 1\)"):
        Prune(amount=1.0)


def test_contract_may_be_named_and_a_wrong_one_is_refused_at_registration() -> None:
    @register_pass
    @dataclass(frozen=True)
    class Named(Pass):
        name = "test-named-contract"
        contract = "lossy(cosine=0.95)"  # type: ignore[assignment]

    assert Named.contract == graphopt.Contract.lossy("cosine", 0.95)
    with pytest.raises(PipelineError, match="'fast' is not a contract; write 'exact'"):

        @register_pass
        @dataclass(frozen=True)
        class Wrong(Pass):
            name = "test-wrong-contract"
            contract = "fast"  # type: ignore[assignment]


@register_pass
@dataclass(frozen=True)
class Finisher(Pass):
    name = "test-finisher"


@register_pass
@dataclass(frozen=True)
class NeedsFinisher(Pass):
    name = "test-needs-finisher"

    def followed_by(self) -> tuple[Pass, ...]:
        return (Finisher(),)


def test_followers_are_scheduled_once() -> None:
    names = [p.name for p in graphopt.parse_pipeline("test-needs-finisher,dce")]
    assert names == ["test-needs-finisher", "test-finisher", "dce"]
    spelled = graphopt.parse_pipeline("test-needs-finisher,test-finisher,dce")  # as .spec() says
    assert [p.name for p in spelled] == names
