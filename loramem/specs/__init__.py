"""One typed spec per operation: the settings of encode, compress, train, answer, library and eval, each declared
once with its default, bounds, choices and help. The CLI's options, eval's config files and run records, and a
server's request bodies are all made from these models (pydantic), and their checks hold for every front-end."""

from loramem.specs.answer import AnswerSpec, AskSpec, ModelSpec, RouteSpec
from loramem.specs.base import Spec, SpecError
from loramem.specs.data import ConvertSpec, FictionSpec
from loramem.specs.eval import DemoSpec, EvalSpec, LibraryModesSpec, ProbeSpec, RaySpec
from loramem.specs.inspect import InspectSpec
from loramem.specs.kv import CompressSpec, EncodeSpec
from loramem.specs.train import MergeSpec, SynthSpec, TrainSpec

__all__ = [
    "AnswerSpec",
    "AskSpec",
    "CompressSpec",
    "ConvertSpec",
    "DemoSpec",
    "EncodeSpec",
    "EvalSpec",
    "FictionSpec",
    "InspectSpec",
    "LibraryModesSpec",
    "MergeSpec",
    "ModelSpec",
    "ProbeSpec",
    "RaySpec",
    "RouteSpec",
    "Spec",
    "SpecError",
    "SynthSpec",
    "TrainSpec",
]
